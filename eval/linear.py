"""DINO's linear evaluation: a linear classifier on frozen features (ViT-S: CLS tokens of the last 4 blocks).

SGD, momentum 0.9, no weight decay, lr = base x batch / 256 with a per-epoch cosine to 0, 100 epochs, weights
N(0, 0.01), bias 0 (DINO's ``eval_linear.py``). Several base learning rates train side by side as separate
heads on the same batches (one pass over the data for a sweep); the best is chosen on a held-out part of the
training set, never on the test set, and only the chosen head is scored on the test set.

Two modes: on cached centre-crop features (fast: no backbone pass per epoch), or DINO's protocol with
RandomResizedCrop + flip through the frozen backbone every epoch (``probe_augmented``), distributed over
ranks with the heads' gradients averaged.
"""

import math
import sys
import time
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .distributed import Ranks, all_reduce_mean_
from .errors import EvalError

DEFAULT_BASE_LR = 1e-3
SWEEP_BASE_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
DEFAULT_EPOCHS = 100
DEFAULT_BATCH = 1024


def scaled_lrs(base_lrs: Sequence[float], batch_size: int) -> List[float]:
    return [float(lr) * batch_size / 256.0 for lr in base_lrs]


class LinearHeads(nn.Module):
    """One linear classifier per learning rate over the same features; one optimizer, a param group each."""

    def __init__(self, dim: int, num_classes: int, lrs: Sequence[float], epochs: int, momentum: float = 0.9):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in lrs)
        for head in self.heads:
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)
        self.lrs, self.epochs = list(lrs), epochs
        self.optimizer = torch.optim.SGD(
            [{'params': h.parameters(), 'lr': lr} for h, lr in zip(self.heads, lrs)],
            momentum=momentum,
            weight_decay=0.0,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(heads, batch, classes) logits."""
        w = torch.stack([h.weight for h in self.heads])
        b = torch.stack([h.bias for h in self.heads])
        return torch.einsum('nd,hcd->hnc', x, w) + b[:, None]

    def set_epoch(self, epoch: int) -> None:
        """Cosine from lr to 0 over the epochs, one step per epoch (DINO's CosineAnnealingLR)."""
        factor = 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            group['lr'] = lr * factor

    def train_step(self, x: torch.Tensor, y: torch.Tensor, ranks: Optional[Ranks] = None) -> torch.Tensor:
        """One SGD step of every head; returns each head's mean cross-entropy (detached)."""
        logits = self(x)
        h, n, c = logits.shape
        per_head = F.cross_entropy(logits.reshape(h * n, c), y.repeat(h), reduction='none').view(h, n).mean(1)
        self.optimizer.zero_grad(set_to_none=True)
        per_head.sum().backward()  # heads share nothing: each gets exactly its own loss's gradient
        if ranks is not None:
            all_reduce_mean_([p.grad for p in self.parameters()], ranks)
        self.optimizer.step()
        return per_head.detach()

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor, batch: int = 8192) -> Dict[str, np.ndarray]:
        """Top-1 / top-5 (%) of every head."""
        correct1 = torch.zeros(len(self.heads))
        correct5 = torch.zeros(len(self.heads))
        top = min(5, self.heads[0].out_features)
        for start in range(0, len(x), batch):
            logits = self(x[start : start + batch])
            target = y[start : start + batch].to(logits.device)
            ranking = logits.topk(top, dim=-1).indices
            correct1 += (ranking[..., 0] == target).sum(1).cpu()
            correct5 += (ranking == target[None, :, None]).any(-1).sum(1).cpu()
        return {'top1': (100.0 * correct1 / len(x)).numpy(), 'top5': (100.0 * correct5 / len(x)).numpy()}


def holdout_split(n: int, fraction: float, seed: int) -> tuple:
    """(train indices, held-out indices): a seeded random part of the training set for choosing the lr."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * fraction))
    if fraction > 0 and not 0 < n_val < n:
        raise EvalError(f'val fraction {fraction} of {n} training samples leaves no held-out or no training data')
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def train_cached(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    lrs: Sequence[float],
    epochs: int,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
    rows: Optional[torch.Tensor] = None,
    base_lrs: Optional[Sequence[float]] = None,
) -> tuple:
    """(trained LinearHeads, last epoch's mean loss per head) on in-memory features; ``rows``: the training
    rows of ``x`` (default all), drawn per batch so the held-out split costs no copy of the features."""
    torch.manual_seed(seed)
    heads = LinearHeads(x.shape[1], num_classes, lrs, epochs).to(device)
    x, y = x.to(device), y.to(device)
    rows = torch.arange(len(x)) if rows is None else rows
    gen = torch.Generator().manual_seed(seed)
    losses = torch.zeros(len(lrs))
    for epoch in range(epochs):
        heads.set_epoch(epoch)
        perm = rows[torch.randperm(len(rows), generator=gen)].to(device)
        losses = torch.zeros(len(lrs), device=device)
        for start in range(0, len(perm), batch_size):
            idx = perm[start : start + batch_size]
            losses += heads.train_step(x[idx], y[idx]) * len(idx)
        losses = (losses / len(perm)).cpu()
        check_losses(losses, epoch, base_lrs or lrs, progress or (lambda msg: None))
        if progress and (epoch + 1) % max(1, epochs // 5) == 0:
            progress(f'[linear] epoch {epoch + 1}/{epochs}: loss {", ".join(f"{v:.3f}" for v in losses)}')
    return heads, losses


def check_losses(losses: torch.Tensor, epoch: int, base_lrs: Sequence[float], progress: Callable[[str], None]) -> None:
    """Stop (EvalError) when every head's loss is NaN or Inf: no head is left to report an accuracy of. A sweep's
    diverged heads are named and left out of the choice (``choose``)."""
    finite = torch.isfinite(losses)
    if not bool(finite.any()):
        raise EvalError(
            f'linear probe: the training loss is not finite ({float(losses[0])}) at epoch {epoch + 1} for every '
            f'learning rate {list(base_lrs)}: diverged; no accuracy is reported (lower --lrs, or check the features)'
        )
    if not bool(finite.all()):
        bad = [lr for lr, ok in zip(base_lrs, finite.tolist()) if not ok]
        progress(f'[linear] warning: base lr {bad} diverged (non-finite loss at epoch {epoch + 1}): not chosen')


def choose(heads: LinearHeads, val: Optional[tuple], losses: torch.Tensor) -> tuple:
    """(index of the chosen head, held-out accuracies or None): best held-out top-1 among the heads whose loss is
    finite, first of equals."""
    if val is None:
        if len(heads.heads) > 1:
            raise EvalError('several learning rates need a held-out set to choose from (not the test set)')
        return 0, None
    acc = heads.accuracy(*val)
    score = np.where(torch.isfinite(losses).numpy(), acc['top1'], -np.inf)
    return int(np.argmax(score)), acc


def report(heads: LinearHeads, best: int, val_acc, test: tuple, base_lrs, batch_size: int, losses) -> Dict:
    test_acc = heads.accuracy(*test)  # only the chosen head's numbers are reported
    out = {
        'lrs': [float(v) for v in base_lrs],
        'lrs_scaled': scaled_lrs(base_lrs, batch_size),
        'best_lr': float(base_lrs[best]),
        'best_lr_scaled': scaled_lrs(base_lrs, batch_size)[best],
        'top1': float(test_acc['top1'][best]),
        'top5': float(test_acc['top5'][best]),
        'train_loss': [float(v) if math.isfinite(v) else None for v in losses.tolist()],  # strict JSON
    }
    if val_acc is not None:
        out['val_top1'] = [float(v) for v in val_acc['top1']]
        out['val_top5'] = [float(v) for v in val_acc['top5']]
    return out


def probe_cached(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    base_lrs: Sequence[float] = (DEFAULT_BASE_LR,),
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH,
    val_fraction: Optional[float] = None,
    seed: int = 0,
    device: Optional[torch.device] = None,
    progress: Optional[Callable[[str], None]] = None,
    val: Optional[tuple] = None,
) -> Dict:
    """Linear probe on cached features; several base lrs are chosen between on a held-out part of train
    (``val_fraction``, default 0.1 for a sweep) or on ``val`` = (features, labels) when given."""
    device = device or torch.device('cpu')
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    val_fraction = (0.1 if len(base_lrs) > 1 else 0.0) if val_fraction is None else val_fraction
    if len(base_lrs) > 1 and val_fraction <= 0 and val is None:
        raise EvalError('a learning-rate sweep needs --val-fraction > 0 (chosen on held-out training data)')
    t0 = time.perf_counter()
    if val is not None:  # a held-out set of its own: train on all of train
        val_fraction = 0.0
    tr, va = holdout_split(len(train_x), val_fraction, seed)
    heads, losses = train_cached(
        train_x,
        train_y,
        num_classes,
        scaled_lrs(base_lrs, batch_size),
        epochs,
        batch_size,
        device,
        seed,
        progress,
        rows=tr,
        base_lrs=base_lrs,
    )
    if val is not None:
        val, n_val = (val[0].to(device), val[1]), len(val[0])
    else:
        val, n_val = ((train_x[va].to(device), train_y[va]) if len(va) else None), len(va)
    best, val_acc = choose(heads, val, losses)
    out = report(heads, best, val_acc, (test_x.to(device), test_y), base_lrs, batch_size, losses)
    out.update(
        mode='cached',
        epochs=epochs,
        batch_size=batch_size,
        val_fraction=val_fraction,
        n_train=len(tr),
        n_val=n_val,
        n_test=len(test_x),
        feature_dim=int(train_x.shape[1]),
        num_classes=num_classes,
        seconds=round(time.perf_counter() - t0, 3),
    )
    return out


def augment_transform(crop: int, mean, std):
    """DINO's linear-eval training augmentation; a list of one view (the shard readers' crop-list format)."""
    from torchvision.transforms import InterpolationMode, v2

    t = v2.Compose(
        [
            v2.RandomResizedCrop(crop, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
    return lambda image: [t(image)]


def probe_augmented(
    module: nn.Module,
    urls: List[str],
    n_train: int,
    feature_fn: Callable,
    spec,
    test: tuple,
    num_classes: int,
    ranks: Ranks,
    base_lrs: Sequence[float] = (DEFAULT_BASE_LR,),
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH,
    val: Optional[tuple] = None,
    num_workers: int = 2,
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
):
    """DINO's protocol: every epoch, augmented training images through the frozen backbone, heads trained on
    the fly (gradients averaged over ranks). ``test`` / ``val``: (features, labels) of centre crops (the
    cache). Returns the result dict on rank 0, None elsewhere."""
    from torch.utils.data import DataLoader

    from skipssl.data import ReaderState
    from skipssl.data.slots import SlotShards, batches, default_slots

    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if len(base_lrs) > 1 and val is None and ranks.main:  # (val lives on rank 0 only)
        raise EvalError(
            'a learning-rate sweep with --augment needs --val-shards (held-out labelled shards); '
            'the test set is never used to choose'
        )
    if batch_size % ranks.world_size:
        raise EvalError(f'batch size {batch_size} does not split over {ranks.world_size} ranks')
    iterations_per_epoch = n_train // batch_size
    if iterations_per_epoch < 1:
        raise EvalError(
            f'augmented linear probe: {n_train} training samples are less than one global batch of {batch_size}'
        )
    device = ranks.device
    try:
        dataset = SlotShards(
            urls,
            global_batch=batch_size,
            n_slots=default_slots(ranks.world_size, num_workers, batch_size),
            iterations_per_epoch=iterations_per_epoch,
            transform=augment_transform(spec.eval_crop, spec.mean, spec.std),
            rank=ranks.rank,
            world_size=ranks.world_size,
            num_workers=num_workers,
            seed=seed,
            shuffle_buffer=min(2000, n_train),
            channels=spec.channels,
        )
    except ValueError as exn:
        raise EvalError(f'augmented linear probe: {exn}') from exn
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if spec.precision == 'bf16' else nullcontext()
    with torch.no_grad(), amp:
        dim = feature_fn(torch.zeros(1, spec.channels, spec.eval_crop, spec.eval_crop, device=device)).shape[1]
    torch.manual_seed(seed)  # the same initial heads on every rank
    heads = LinearHeads(dim, num_classes, scaled_lrs(base_lrs, batch_size), epochs).to(device)
    torch.manual_seed(seed * 1000 + ranks.rank + 1)  # but each rank its own augmentations
    t0 = time.perf_counter()
    losses = torch.zeros(len(base_lrs))
    for epoch in range(epochs):
        heads.set_epoch(epoch)
        dataset.set_state(ReaderState(epoch=epoch))
        loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
        total, seen = torch.zeros(len(base_lrs)), 0
        for batch in batches(loader, dataset):
            with torch.no_grad(), amp:
                feats = feature_fn(batch['crops'][0].to(device, non_blocking=True)).float()
            bad = ((batch['labels'] < 0) | (batch['labels'] >= num_classes)).nonzero()
            if len(bad):  # the training shards are read here, not by the feature extraction that checks labels
                i = int(bad[0])
                raise EvalError(
                    f'augmented linear probe: training sample {batch["keys"][i]} has label '
                    f'{int(batch["labels"][i])}, not one of the {num_classes} classes (0..{num_classes - 1})'
                )
            labels = batch['labels'].to(device)
            total += heads.train_step(feats, labels, ranks).cpu() * len(labels)
            seen += len(labels)
        losses = total / max(seen, 1)
        all_reduce_mean_([losses], ranks)  # every rank ran the same number of equal batches
        check_losses(losses, epoch, base_lrs, progress if ranks.main else (lambda msg: None))
        if ranks.main and (epoch + 1) % max(1, epochs // 5) == 0:
            progress(f'[linear] epoch {epoch + 1}/{epochs}: loss {", ".join(f"{v:.3f}" for v in losses)}')
    if not ranks.main:
        return None
    val_dev = (val[0].to(device), val[1]) if val is not None else None
    best, val_acc = choose(heads, val_dev, losses)
    out = report(heads, best, val_acc, (test[0].to(device), test[1]), base_lrs, batch_size, losses)
    out.update(
        mode='augment',
        epochs=epochs,
        batch_size=batch_size,
        n_train=iterations_per_epoch * batch_size,
        n_val=len(val[0]) if val is not None else 0,
        n_test=len(test[0]),
        feature_dim=int(heads.heads[0].in_features),
        num_classes=num_classes,
        seconds=round(time.perf_counter() - t0, 3),
    )
    return out

"""Centred kernel alignment (CKA) between the blocks of a ViT, streamed over minibatches, and the skip choice
it suggests (SkipAt, section 3.2 and Fig. 3).

Estimator (Nguyen, Raghu, Kornblith, ICLR 2021): per minibatch of n images, the unbiased HSIC_1 of Song et al.
(2012) between the linear-kernel Gram matrices K = X X^T of every pair of layers; the sums over minibatches give
CKA = sum HSIC(K, L) / sqrt(sum HSIC(K, K) * sum HSIC(L, L)). Only (layers, n, n) Grams exist per batch and the
(layers, layers) sums stay on the device, so memory does not grow with the number of images.

The command that runs it on a checkpoint is :mod:`skipssl_eval.cka` (``skipssl-cka``).
"""

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, cast

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .capture import SKIPPED, BlockCapture

MIN_BATCH = 4  # the unbiased HSIC divides by n (n - 3)


# -- estimator ------------------------------------------------------------------------------------------
def unbiased_hsic(grams: torch.Tensor) -> torch.Tensor:
    """(L, L) unbiased HSIC_1 of every pair of the (L, n, n) Gram matrices, in float64.

    HSIC_1(K, L) = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)), K~ = K with zero
    diagonal. For all pairs at once: tr(K~_i L~_j) is a dot product of the flattened (symmetric) matrices and
    1'K~_i K~_j 1 one of their row sums, so the whole (L, L) matrix is two small matrix products.
    """
    L, n, _ = grams.shape
    if n < MIN_BATCH:
        raise ValueError(f'the unbiased HSIC needs at least {MIN_BATCH} samples per batch, got {n}')
    k = grams.double().clone()
    k.diagonal(dim1=1, dim2=2).zero_()
    flat = k.reshape(L, n * n)
    trace = flat @ flat.T
    rows = k.sum(2)  # (L, n): K~ 1
    totals = rows.sum(1)  # (L,):   1'K~1
    return (trace + torch.outer(totals, totals) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rows @ rows.T)) / (n * (n - 3))


def cka_from_hsic(hsic: torch.Tensor) -> torch.Tensor:
    """CKA matrix from summed HSIC: hsic / sqrt(diag diag^T); NaN where a representation has zero HSIC."""
    diag = hsic.diagonal().clamp_min(0)
    denom = torch.sqrt(torch.outer(diag, diag))
    return torch.where(denom > 0, hsic / denom, torch.full_like(hsic, float('nan')))


class StreamingCKA:
    """Sums of minibatch unbiased HSIC for every pair of L representations; on the device of the Grams."""

    def __init__(self) -> None:
        self.hsic: Optional[torch.Tensor] = None
        self.images = 0
        self.batches = 0

    def update(self, grams: torch.Tensor) -> None:
        """Add one minibatch: (L, n, n) Grams of the same n images. No host synchronisation."""
        h = unbiased_hsic(grams)
        self.hsic = h if self.hsic is None else self.hsic + h
        self.images += grams.shape[1]
        self.batches += 1

    def cka(self) -> torch.Tensor:
        if self.hsic is None:
            raise ValueError('no minibatch was added')
        return cka_from_hsic(self.hsic)


# -- skip selection -------------------------------------------------------------------------------------
def choose_skips(cka: Sequence[Sequence[float]], k: int) -> Tuple[List[int], float]:
    """(the k blocks to skip, their summed score): exact maximum of sum over skipped j of CKA(Z_j, Z_p(j)),
    p(j) being the last block before j that is not skipped (the one whose Z the skipped block's Phi reads).

    The score of a block depends on which earlier blocks are skipped, so a greedy pick can be wrong; a dynamic
    programme over (block, last computed block, skips so far) is exact in O(depth^2 k). Block 0 is never
    skipped (nothing before it to reuse).
    """
    m = [[float(v) for v in row] for row in cka]
    depth = len(m)
    if not 0 <= k <= depth - 1:
        raise ValueError(f'--skips {k}: a model of {depth} blocks can skip 0..{depth - 1} (never block 0)')
    neg = -math.inf
    # best[(last, s)] = (score, skipped) after the blocks seen so far, last computed block `last`, s skips
    best: Dict[Tuple[int, int], Tuple[float, Tuple[int, ...]]] = {(0, 0): (0.0, ())}
    for j in range(1, depth):
        nxt: Dict[Tuple[int, int], Tuple[float, Tuple[int, ...]]] = {}
        for (last, s), (score, skipped) in best.items():
            options = [((j, s), score, skipped)]  # compute block j
            if s < k:
                value = m[j][last]
                value = neg if math.isnan(value) else value
                options.append(((last, s + 1), score + value, skipped + (j,)))
            for key, sc, sk in options:
                if key not in nxt or sc > nxt[key][0]:
                    nxt[key] = (sc, sk)
        best = nxt
    score, skipped = max((v for (_, s), v in best.items() if s == k), key=lambda v: v[0])
    return list(skipped), score


def skip_variants(
    model: nn.Module, model_name: str, model_kwargs: Dict[str, Any], skips: Sequence[int]
) -> Tuple[nn.Module, nn.Module]:
    """(the model's architecture without any skip, with ``skips``), rebuilt with random weights: what they cost
    does not depend on the weights."""
    from skipssl.checkpoint import build_backbone
    from skipssl.models import convert_to_skipat

    kwargs = {key: v for key, v in model_kwargs.items() if key != 'skip_indices'}
    if hasattr(model, 'skip_indices'):  # a SkipAt model: the same name with other skip indices
        plain = build_backbone(model_name, {**kwargs, 'skip_indices': ()}).eval()
        skipped = build_backbone(model_name, {**kwargs, 'skip_indices': tuple(skips)}).eval()
    else:  # a timm ViT: converted
        plain = build_backbone(model_name, kwargs).eval()
        skipped = convert_to_skipat(cast(VisionTransformer, plain), skips) if skips else plain  # a timm ViT
    return plain, skipped


def cost_of_skips(
    plain: nn.Module,
    skipped: nn.Module,
    input_size: Tuple[int, ...],
    device: torch.device,
    batch_size: int,
    precision: str = 'fp32',
    repeats: int = 3,
) -> Dict[str, Any]:
    """MACs per image (torch's FLOP counter) and inference images/s measured interleaved on ``device`` at
    ``batch_size`` (0: not timed) of the two variants, and the ratio of their rates."""
    from skipssl.models import count_macs
    from skipssl.models.throughput import interleaved_rates, rate_report

    cost: Dict[str, Any] = {
        'macs_without_skips': count_macs(plain, input_size),
        'macs_with_skips': count_macs(skipped, input_size),
        'input_size': list(input_size[1:]),
    }
    if batch_size <= 0:
        return cost
    x = torch.randn((batch_size,) + tuple(input_size[1:]), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == 'bf16' else nullcontext()

    def forward(model: nn.Module):
        def step() -> None:
            with torch.inference_mode(), autocast:
                model(x)

        return step

    models = {'without_skips': plain.to(device), 'with_skips': skipped.to(device)}
    rates = interleaved_rates(
        {k: forward(m) for k, m in models.items()},
        batch_size,
        iters=2 if device.type == 'cpu' else 10,
        repeats=repeats,
        device=device,
    )
    cost['throughput'] = {
        'device': str(device),
        'precision': precision,
        'batch_size': batch_size,
        **rate_report(
            rates,
            'without_skips',
            'with_skips',
            ('img_per_s_without_skips', 'img_per_s_with_skips', 'speedup', 'per_repeat'),
        ),
    }
    return cost


# -- measurement ----------------------------------------------------------------------------------------
def measure(
    model: nn.Module, batches, device: torch.device, max_images: Optional[int] = None, precision: str = 'fp32', log=None
) -> Dict[str, Any]:
    """Stream ``batches`` (image tensors) through ``model``; CKA of Z over all blocks, of the CLS attention
    (per head and head-averaged) over the computed blocks. Batches are cut to ``max_images`` in total; a last
    batch under 4 images is left out (the estimator needs 4)."""
    capture = BlockCapture(model)
    depth = len(capture.kinds)
    computed = [i for i, kind in enumerate(capture.kinds) if kind != SKIPPED]
    z_stream, attn_stream = StreamingCKA(), StreamingCKA()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == 'bf16' else nullcontext()
    seen, start = 0, time.time()
    with capture, torch.inference_mode():
        for images in batches:
            if max_images is not None:
                images = images[: max_images - seen]
            if images.shape[0] < MIN_BATCH:
                break
            capture.clear()
            with autocast:
                cast(VisionTransformer, model).forward_features(images.to(device, non_blocking=True))  # a timm ViT
            z_grams = capture.stacked(capture.z_grams, list(range(depth)))
            if not bool(torch.isfinite(z_grams).all()):  # NaN would give an all-null CKA matrix and a made-up choice
                raise ValueError(
                    f'the model gives non-finite activations (NaN/Inf) in images {seen}..{seen + len(images) - 1}: '
                    'no CKA can be computed from them'
                )
            z_stream.update(z_grams)
            if computed:
                attn = capture.stacked(capture.attn_grams, computed)  # (C, heads + 1, n, n)
                attn_stream.update(attn.transpose(0, 1).reshape(-1, *attn.shape[2:]))
            seen += images.shape[0]
            if log and z_stream.batches % 20 == 0:
                log(f'{seen} images, {seen / (time.time() - start):.0f} img/s')
            if max_images is not None and seen >= max_images:
                break
    if z_stream.batches == 0:
        raise ValueError(f'no batch of at least {MIN_BATCH} images was read')
    attention_heads: List[Any] = []
    attention_mean: List[Any] = []
    if computed:
        heads = capture.attn_grams[computed[0]].shape[0] - 1
        attn_cka = attn_stream.cka().reshape(heads + 1, len(computed), heads + 1, len(computed))
        attention_heads = [attn_cka[h, :, h].cpu().tolist() for h in range(heads)]
        attention_mean = attn_cka[heads, :, heads].cpu().tolist()
    return {
        'images': seen,
        'batches': z_stream.batches,
        'depth': depth,
        'computed_blocks': computed,
        'skipped_blocks': [i for i in range(depth) if i not in computed],
        'z': z_stream.cka().cpu().tolist(),
        'attention_heads': attention_heads,
        'attention_mean': attention_mean,
    }


# -- outputs --------------------------------------------------------------------------------------------
def plot_matrix(
    matrix: Sequence[Sequence[float]], labels: Sequence[int], title: str, path: Path, skipped: Sequence[int] = ()
) -> None:
    """A layer x layer heat map with the values written in the cells, like the paper's Fig. 3; skipped blocks'
    labels are marked with '*'."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array(matrix, dtype=float)
    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.6 * n), max(4.5, 1.0 + 0.6 * n)))
    im = ax.imshow(values, vmin=0, vmax=1, cmap='viridis', origin='lower')
    names = [f'{i}*' if i in skipped else str(i) for i in labels]
    ax.set_xticks(range(n), names)
    ax.set_yticks(range(n), names)
    ax.set_xlabel('block')
    ax.set_ylabel('block')
    for r in range(n):
        for c in range(n):
            if not np.isnan(values[r, c]):
                ax.text(
                    c,
                    r,
                    f'{values[r, c]:.2f}',
                    ha='center',
                    va='center',
                    fontsize=7,
                    color='black' if values[r, c] > 0.6 else 'white',
                )
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def skip_line(skips: Sequence[int]) -> str:
    """The config override that applies the suggestion."""
    return f'model.kwargs.skip_indices=[{",".join(str(i) for i in skips)}]'


def default_skips(depth: int) -> int:
    """SkipAt skips 6 of 12 blocks: half of the blocks, never block 0."""
    return min(depth // 2, depth - 1)

"""Feature extraction over evaluation shards, distributed over ranks, cached on disk.

One forward pass gives both evaluators' features: the CLS tokens of the last ``n_last_blocks`` blocks after
the final norm, concatenated (DINO's linear-probe features); the last block's slice is the backbone's output
(DINO's k-NN feature), so the k-NN reads only those columns of the same cache file.

Cache file ``{sha256[:16]}-{teacher|student|export|random-init|pixels}-{role}-{digest}.safetensors``: the
weights' digest, and a digest of everything else that changes the features (the shards' content digest,
preprocessing, precision, blocks): shards relabelled or replaced under the same names and sizes miss the
cache. Tensors 'features' (N, D) float32, 'labels' (N,) int64, 'keys' (UTF-8, newline-joined),
rows sorted by sample key, so every world size and worker count gives the same file.
"""

import functools
import hashlib
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from skipssl.data import EvalShards, eval_transform
from skipssl.models import last_cls_tokens
from skipssl_common.io import atomic_path

from .data import Split
from .distributed import Ranks, gather_objects, gather_rows
from .errors import EvalError
from .source import ModelInfo

FEATURES_FORMAT = 'skipssl-features/1'


@dataclass(frozen=True)
class FeatureSpec:
    """Everything besides the weights and the shards that changes the features."""

    n_last_blocks: int
    channels: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    eval_resize: int
    eval_crop: int
    precision: str  # 'fp32' | 'bf16' (autocast)

    @classmethod
    def make(cls, n_last_blocks: int, data: dict, precision: str) -> 'FeatureSpec':
        return cls(
            n_last_blocks,
            data['channels'],
            tuple(data['mean']),
            tuple(data['std']),
            data['eval_resize'],
            data['eval_crop'],
            precision,
        )

    def transform(self):
        return eval_transform(self.eval_resize, self.eval_crop, self.mean, self.std)


def feature_fn(module: Optional[nn.Module], n_last_blocks: int) -> Tuple[Callable, Optional[int]]:
    """(batch -> (B, D) features, k-NN width: the trailing columns that are the backbone's output)."""
    if module is None:  # raw pixels: every column is the k-NN feature
        return (lambda x: x.flatten(1)), None
    return (lambda x: last_cls_tokens(module, x, n_last_blocks)), module.num_features


def cache_path(cache_dir: os.PathLike, info: ModelInfo, split: Split, spec: FeatureSpec) -> Path:
    if split.digest is None:
        raise RuntimeError(f'{split.role} shards {split.spec}: no content digest (verify_split first)')
    key = json.dumps(
        {
            'spec': asdict(spec),
            'shards': split.digest,
            'label_limit': split.label_limit,
            'which': info.which,
            'model': [info.model_name, info.model_kwargs],
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cache_dir) / f'{info.sha256[:16]}-{info.which or info.kind}-{split.role}-{digest}.safetensors'


class FeatureFile:
    """Read access to a cached feature file: labels in memory, feature rows read on demand."""

    def __init__(self, path: os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        with safe_open(str(self.path), framework='pt') as f:
            self.meta = dict(f.metadata() or {})
            if self.meta.get('format') != FEATURES_FORMAT:
                raise EvalError(f'{path} is not a feature cache ({FEATURES_FORMAT})')
            self.num, self.dim = f.get_slice('features').get_shape()
            self.labels = f.get_tensor('labels').numpy()
        self.knn_dim = int(self.meta['knn_dim'])

    def rows(self, start: int, stop: int, knn: bool = False) -> np.ndarray:
        """float32 rows [start, stop); with ``knn`` only the k-NN columns (the last block's CLS)."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework='pt') as f:
            part = f.get_slice('features')
            block = part[start:stop, self.dim - self.knn_dim : self.dim] if knn else part[start:stop]
        return block.numpy()

    def knn_rows(self):
        """The k-NN columns as a Rows matrix read block by block."""
        from .knn import Rows

        return Rows(self.num, self.knn_dim, functools.partial(self.rows, knn=True))

    def keys(self) -> list:
        from safetensors import safe_open

        with safe_open(str(self.path), framework='pt') as f:
            return bytes(f.get_tensor('keys').numpy()).decode().split('\n')

    @property
    def num_classes(self) -> int:
        return int(self.meta.get('num_classes', int(self.labels.max()) + 1 if self.num else 0))


def extract(
    module: Optional[nn.Module],
    split: Split,
    spec: FeatureSpec,
    ranks: Ranks,
    batch_size: int = 128,
    num_workers: int = 2,
    log: Callable[[str], None] = None,
):
    """(features (N, D) float32, labels (N,), keys) sorted by key on rank 0, None on the other ranks.
    Each rank reads a disjoint part of the shards (EvalShards), in batches, bf16 autocast if asked."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    fn, _ = feature_fn(module, spec.n_last_blocks)
    device = ranks.device
    dataset = EvalShards(
        split.urls,
        spec.transform(),
        rank=ranks.rank,
        world_size=ranks.world_size,
        channels=spec.channels,
        require_labels=True,
        num_classes=split.label_limit,
        label_bound=split.label_limit_reason,
    )
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == 'cuda')
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if spec.precision == 'bf16' else nullcontext()
    try:  # the width, for a rank that gets no sample; and a model that cannot take the input fails here
        with torch.inference_mode(), amp:
            dim = fn(torch.zeros(1, spec.channels, spec.eval_crop, spec.eval_crop, device=device)).shape[1]
    except (AssertionError, RuntimeError, ValueError) as exn:
        raise EvalError(
            f'the model cannot take {spec.channels}x{spec.eval_crop}x{spec.eval_crop} inputs: {exn}'
        ) from exn
    feats, labels, keys = [], [], []
    start, seen = time.perf_counter(), 0
    try:
        with torch.inference_mode(), amp:
            for step, (images, y, k) in enumerate(loader):
                out = fn(images.to(device, non_blocking=True)).float().cpu()
                finite = torch.isfinite(out).all(1)
                if not bool(finite.all()):  # finite weights can still give NaN (overflow in bf16, a bad norm)
                    raise EvalError(
                        f'{split.role} shards {split.spec}: the model gives non-finite features (NaN/Inf) for sample '
                        f'{k[int((~finite).nonzero()[0])]}: no accuracy can be computed from them'
                    )
                feats.append(out)
                labels.append(y)
                keys.extend(k)
                seen += len(y)
                if ranks.main and step % 50 == 49:
                    log(
                        f'[features] {split.role}: {seen * ranks.world_size} images, '
                        f'{seen / (time.perf_counter() - start):.0f} img/s per rank'
                    )
    except ValueError as exn:  # EvalShards: a sample without a label, or a label out of range, further in
        raise EvalError(f'{split.role} shards {split.spec}: {worker_message(exn)}') from exn
    feats = torch.cat(feats) if feats else torch.empty(0, dim)
    labels = torch.cat(labels).long() if labels else torch.empty(0, dtype=torch.long)
    all_feats = gather_rows(feats, ranks)
    all_labels = gather_rows(labels, ranks)
    all_keys = gather_objects(keys, ranks)
    if not ranks.main:
        return None
    all_keys = [k for part in all_keys for k in part]
    if not all_keys:
        raise EvalError(f'{split.role} shards {split.spec}: no readable sample')
    order = np.argsort(np.array(all_keys), kind='stable')
    sorted_keys = [all_keys[i] for i in order]
    dupes = [a for a, b in zip(sorted_keys, sorted_keys[1:]) if a == b]
    if dupes:
        raise EvalError(
            f'{split.role} shards {split.spec}: sample key {dupes[0]} appears more than once '
            f'({len(dupes)} duplicates): overlapping shards?'
        )
    index = torch.from_numpy(order)
    return all_feats[index], all_labels[index], sorted_keys


def worker_message(exn: BaseException) -> str:
    """The message a data-loader worker raised: the loader re-raises it in the main process as 'Caught
    ValueError in DataLoader worker process 0.' followed by the worker's whole traceback; its last line is the
    error itself."""
    text = str(exn)
    if not text.startswith('Caught '):
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(': ', 1)[1] if ': ' in last else last


def save_features(path: Path, features: torch.Tensor, labels: torch.Tensor, keys: list, meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    blob = torch.frombuffer(bytearray('\n'.join(keys).encode()), dtype=torch.uint8)
    with atomic_path(path) as tmp:
        save_file(
            {'features': features.contiguous(), 'labels': labels.contiguous(), 'keys': blob},
            str(tmp),
            metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()},
        )


def get_features(
    module: Optional[nn.Module],
    info: ModelInfo,
    split: Split,
    spec: FeatureSpec,
    cache_dir: os.PathLike,
    ranks: Ranks,
    batch_size: int = 128,
    num_workers: int = 2,
    refresh: bool = False,
    log: Callable[[str], None] = None,
) -> Optional[FeatureFile]:
    """The cached features of ``split`` (extracted on every rank if not cached yet); the FeatureFile on
    rank 0, None on the others."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    path = cache_path(cache_dir, info, split, spec)
    if path.is_file() and not refresh:
        if ranks.main:
            log(f'[features] {split.role}: cached {path}')
        return FeatureFile(path) if ranks.main else None
    t0 = time.perf_counter()
    got = extract(module, split, spec, ranks, batch_size, num_workers, log)
    if ranks.main:
        features, labels, keys = got
        seconds = time.perf_counter() - t0
        _, knn_dim = feature_fn(module, spec.n_last_blocks)
        num_classes = len(split.classes) if split.classes else int(labels.max()) + 1
        meta = {
            'format': FEATURES_FORMAT,
            'role': split.role,
            'shards': split.spec,
            'num_samples': len(keys),
            'expected_num_samples': split.num_samples,
            'data_digest': split.digest,
            'num_classes': num_classes,
            'knn_dim': knn_dim or features.shape[1],
            'spec': asdict(spec),
            'model': info.as_dict(),
            'world_size': ranks.world_size,
            'device': str(ranks.device),
            'extract_seconds': round(seconds, 3),
            'keys_sha256': hashlib.sha256('\n'.join(keys).encode()).hexdigest(),
        }
        save_features(path, features, labels, keys, meta)
        log(f'[features] {split.role}: {len(keys)} x {features.shape[1]} in {seconds:.1f} s -> {path}')
        if split.num_samples is not None and split.num_samples != len(keys):
            log(
                f'[features] warning: {split.spec} holds {split.num_samples} samples, {len(keys)} were readable: '
                f'{split.num_samples - len(keys)} skipped (warnings above name them)'
            )
    ranks.barrier()  # the file exists for everyone before anyone goes on
    return FeatureFile(path) if ranks.main else None

"""Synthetic inputs for tests and benchmarks: labelled image shards in the shard writer's format, and
clustered feature matrices."""

import io
import json
import tarfile
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

from skipssl_common.artefacts import SHARD_INDEX_FORMAT


def class_image(rng: np.random.Generator, label: int, size: int, channels: int) -> np.ndarray:
    """A uint8 image whose brightness and stripe period depend on the class (learnable), plus noise."""
    y = np.arange(size)[:, None]
    stripes = 40.0 * np.sin(2 * np.pi * y / (3 + label)) * np.ones((1, size))
    img = 60.0 + 25.0 * label + stripes + rng.normal(0, 12, (size, size))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return img if channels == 1 else np.repeat(img[..., None], channels, axis=2)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    out_dir: Path,
    prefix: str,
    counts: Sequence[int],
    num_classes: int = 4,
    size: int = 16,
    channels: int = 1,
    labels: bool = True,
    seed: int = 0,
    index: bool = True,
    key_offset: int = 0,
) -> List[str]:
    """Shards ``{prefix}-%06d.tar`` with ``counts[i]`` samples each (``{key}.png`` [+ ``{key}.cls``]) and,
    with ``index``, ``{prefix}-index.json``. Keys are unique over the shards; labels cycle through classes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    urls, entries, n = [], [], key_offset
    for s, count in enumerate(counts):
        path = out_dir / f'{prefix}-{s:06d}.tar'
        with tarfile.open(path, 'w', format=tarfile.USTAR_FORMAT) as tar:
            for _ in range(count):
                key, label = f'{prefix}_{n:06d}', int(rng.integers(num_classes))
                buf = io.BytesIO()
                Image.fromarray(class_image(rng, label, size, channels)).save(buf, format='PNG')
                _add(tar, f'{key}.png', buf.getvalue())
                if labels:
                    _add(tar, f'{key}.cls', str(label).encode())
                n += 1
        urls.append(str(path))
        entries.append({'name': path.name, 'num_samples': count, 'num_bytes': path.stat().st_size})
    if index:
        (out_dir / f'{prefix}-index.json').write_text(
            json.dumps(
                {
                    'format': SHARD_INDEX_FORMAT,
                    'prefix': prefix,
                    'split': prefix,
                    'source': 'synthetic',
                    'num_samples': int(sum(counts)),
                    'num_classes': num_classes if labels else 0,
                    'classes': [f'class{c}' for c in range(num_classes)] if labels else [],
                    'shards': entries,
                }
            )
        )
    return urls


def clustered_features(
    n: int, dim: int, num_classes: int, spread: float = 1.0, seed: int = 0, centers: Optional[np.ndarray] = None
):
    """(float32 features (n, dim), int64 labels, centers): Gaussian clusters around random unit centres."""
    rng = np.random.default_rng(seed)
    if centers is None:
        centers = rng.normal(size=(num_classes, dim)).astype(np.float32)
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = rng.integers(num_classes, size=n)
    feats = centers[labels] + spread / np.sqrt(dim) * rng.normal(size=(n, dim)).astype(np.float32)
    return feats.astype(np.float32), labels.astype(np.int64), centers

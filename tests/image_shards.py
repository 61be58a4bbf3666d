"""Small labelled image shards for training tests: 10 classes of oriented gratings with random phase and
noise, written as WebDataset tars with a make_shards-style index."""

import io
import json
import math
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from skipssl_common.artefacts import SHARD_INDEX_FORMAT


def pattern(label: int, rng: np.random.Generator, size: int = 28) -> np.ndarray:
    angle = math.pi * label / 10
    freq = 2 * math.pi * (2 + label % 3) / size
    y, x = np.mgrid[0:size, 0:size]
    wave = np.sin(freq * (x * math.cos(angle) + y * math.sin(angle)) + rng.uniform(0, 2 * math.pi))
    img = 127.5 + 100 * wave + rng.normal(0, 20, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_pattern_shards(
    folder, n: int, n_shards: int = 4, size: int = 28, seed: int = 0, prefix: str = 'train'
) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    per = math.ceil(n / n_shards)
    for s in range(n_shards):
        name = f'{prefix}-{s:06d}.tar'
        count = 0
        with wds.TarWriter(str(folder / name)) as w:
            for i in range(s * per, min(n, (s + 1) * per)):
                label = int(rng.integers(10))
                buf = io.BytesIO()
                Image.fromarray(pattern(label, rng, size)).save(buf, format='PNG')
                w.write({'__key__': f'{i:08d}', 'png': buf.getvalue(), 'cls': str(label).encode()})
                count += 1
        shards.append({'name': name, 'num_samples': count})
    index = {'format': SHARD_INDEX_FORMAT, 'num_samples': n, 'num_classes': 10, 'shards': shards}
    (folder / f'{prefix}-index.json').write_text(json.dumps(index))
    return folder

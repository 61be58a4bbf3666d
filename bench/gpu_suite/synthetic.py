"""Labelled synthetic photographs-by-size for the GPU machine, which has no image data set: written by the
project's shard writer (``skipssl.data.make_shards.write_shards``) as JPEG shards with an index, like any
real source.

Each class is an oriented grating with its own angle and frequency; colour, phase, contrast, period (by up
to 15 %), a low-frequency colour field and pixel noise vary per image. So the JPEGs cost the decoder what
photographs of that size cost (noise keeps them from compressing to nothing), DINO has something to learn in
a few hundred steps, and a k-NN on the features is above chance when the features mean something. Colour
says nothing about the class, and a horizontal flip (a DINO augmentation) turns class c's angle into class
(10 - c)'s: the task is not trivial.
"""

import hashlib
import math
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
from PIL import Image

from skipssl.data.sources import Sample

NUM_CLASSES = 10


def synthetic_image(label: int, seed: int, size: Tuple[int, int]) -> np.ndarray:
    """(h, w, 3) uint8: class ``label``'s grating, this image's phase, contrast, colour field and noise."""
    w, h = size
    rng = np.random.default_rng(seed)
    angle = math.pi * label / NUM_CLASSES
    period = min(w, h) / (3 + 2 * (label % 4)) * rng.uniform(0.85, 1.15)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    wave = np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period + rng.uniform(0, 2 * math.pi))
    hue = rng.uniform(0, 2 * math.pi)
    colour = 0.5 + 0.4 * np.cos(hue + np.array([0.0, 2.1, 4.2], np.float32))
    field = (
        np.asarray(
            Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR), np.float32
        )
        / 255.0
    )
    img = 255 * (0.35 * field + 0.65 * colour) * (0.6 + rng.uniform(0.2, 0.4) * wave[..., None])
    img += rng.normal(0, 10, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


class SyntheticSource:
    """A shard-writer source (see skipssl.data.sources) of ``n`` synthetic images of ``size`` (w, h)."""

    kind = 'synthetic'
    formats = ('jpeg',)
    classes = [f'grating{c}' for c in range(NUM_CLASSES)]

    def __init__(self, split: str, n: int, size: Tuple[int, int], seed: int = 0):
        self.split, self.size, self.seed = split, tuple(size), seed
        labels = np.random.default_rng([seed, len(split)]).integers(NUM_CLASSES, size=n)
        self.samples = [
            Sample(f'synthetic_{split}_{i:07d}', int(c), f'synthetic/{split}/{i}') for i, c in enumerate(labels)
        ]

    def _seed(self, index: int) -> int:
        return int.from_bytes(hashlib.sha256(f'{self.seed}/{self.split}/{index}'.encode()).digest()[:8], 'little')

    def location(self, index: int) -> str:
        return self.samples[index].source

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(synthetic_image(self.samples[index].label, self._seed(index), self.size))

    def fingerprint(self) -> str:
        return hashlib.sha256(repr((self.split, len(self.samples), self.size, self.seed)).encode()).hexdigest()


def make_datasets(
    out_dir: Path, counts: Dict[str, int], size: Tuple[int, int], workers: int, per_shard: int = 256
) -> Dict[str, Path]:
    """Shards ``{out_dir}/{split}/{split}-*.tar`` + index per split; a re-run keeps finished ones."""
    from skipssl.data.make_shards import write_shards

    folders = {}
    for split, n in counts.items():
        folders[split] = Path(out_dir) / split
        write_shards(
            SyntheticSource(split, n, size),
            folders[split],
            split,
            max_samples=per_shard,
            max_bytes=0,
            reencode='jpeg',
            quality=90,
            workers=workers,
            progress=False,
        )
    return folders

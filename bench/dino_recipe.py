"""The project's rendering of DINO's own augmentation (main_dino.py, DataAugmentationDINO): torchvision's classic
transforms on PIL images, PIL's Gaussian blur and solarize, ToTensor + Normalize. The data benchmark's baseline,
with DINO's numbers read from a MultiCropConfig. Like DINO, blur and solarisation draw from Python's ``random``.
"""

import io
import random
from typing import List

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from skipssl.data import MultiCropConfig


class PILGaussianBlur:
    """DINO's GaussianBlur: with probability p, PIL's GaussianBlur with radius uniform in (low, high)."""

    def __init__(self, p: float, low: float, high: float) -> None:
        self.p, self.low, self.high = p, low, high

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.low, self.high)))


class PILSolarize:
    """DINO's Solarization: with probability p, PIL's ImageOps.solarize (threshold 128)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class DinoRecipe:
    """bytes of an encoded image -> list of n_crops normalised float crops, as DINO's data loader makes them
    (PIL's loader: open, convert to RGB; then DataAugmentationDINO)."""

    def __init__(self, cfg: MultiCropConfig) -> None:
        bicubic = T.InterpolationMode.BICUBIC
        flip_and_jitter = T.Compose(
            [
                T.RandomHorizontalFlip(p=cfg.flip_p),
                T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.jitter_p),
                T.RandomGrayscale(p=cfg.grayscale_p),
            ]
        )
        normalize = T.Compose([T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
        self.crops = []
        for spec in cfg.crop_specs():
            steps = [
                T.RandomResizedCrop(spec['size'], scale=spec['scale'], ratio=cfg.ratio, interpolation=bicubic),
                flip_and_jitter,
                PILGaussianBlur(spec['blur_p'], *cfg.blur_sigma),
            ]
            if spec['solarize_p'] > 0:
                steps.append(PILSolarize(spec['solarize_p']))
            self.crops.append(T.Compose(steps + [normalize]))

    def __call__(self, data: bytes) -> List[torch.Tensor]:
        image = Image.open(io.BytesIO(data)).convert('RGB')
        return [t(image) for t in self.crops]

"""DINO's multi-crop augmentation, three ways with one recipe.

- ``MultiCropTransform`` (``cpu_multicrop``): per image, for data-loader workers, fast on one core.
- ``TorchvisionMultiCrop``: per image, torchvision.transforms.v2 crop by crop: the reference the other two are
  tested against, and the benchmark's "before".
- ``BatchedMultiCrop``: per batch of uint8 images on the training device (GPU), vectorised: every crop of
  every image gets its own random parameters, without a Python loop over images and without host syncs.
  Use it when the CPU has too few cores per GPU to keep up.

Recipe (Caron et al. 2021): 2 global crops (RandomResizedCrop bicubic, scale (0.4, 1)) and N local crops
(scale (0.05, 0.4)); horizontal flip; colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, in random order;
grayscale p 0.2; Gaussian blur sigma in (0.1, 2) with p 1.0 / 0.1 / 0.5 (global 1 / global 2 / local);
solarisation p 0.2 on global crop 2 only; ImageNet normalisation. Every number is a field of MultiCropConfig.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union, overload

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision


@dataclass
class MultiCropConfig:
    global_size: int = 224
    local_size: int = 96
    n_global: int = 2
    n_local: int = 10
    global_scale: Tuple[float, float] = (0.4, 1.0)
    local_scale: Tuple[float, float] = (0.05, 0.4)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int = 0  # 0: 2 * ceil(3 * max sigma) + 1
    blur_p_global1: float = 1.0
    blur_p_global2: float = 0.1
    blur_p_local: float = 0.5
    solarize_p: float = 0.2  # global crop 2 only
    solarize_threshold: float = 0.5  # on [0, 1] images (128 / 255 for uint8)
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.n_global != 2:
            raise ValueError(f"DINO uses exactly 2 global crops (the teacher's views), got n_global={self.n_global}")
        if self.n_local < 0:
            raise ValueError(f'n_local must be >= 0, got {self.n_local}')
        for name in ('global_scale', 'local_scale', 'ratio', 'blur_sigma'):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f'{name} must satisfy 0 < low <= high, got {(lo, hi)}')
        for name in (
            'flip_p',
            'jitter_p',
            'grayscale_p',
            'blur_p_global1',
            'blur_p_global2',
            'blur_p_local',
            'solarize_p',
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f'{name} must be a probability in [0, 1], got {getattr(self, name)}')
        if len(self.mean) != len(self.std):
            raise ValueError(f'mean {self.mean} and std {self.std} must have one value per channel')
        if self.blur_kernel_size and self.blur_kernel_size % 2 == 0:
            raise ValueError(f'blur_kernel_size must be odd, got {self.blur_kernel_size}')
        if min(self.global_size, self.local_size) <= self.kernel_size // 2:
            raise ValueError(
                f"crops of {min(self.global_size, self.local_size)} px are too small for the blur's "
                f'reflect padding of {self.kernel_size // 2} px (blur_kernel_size {self.kernel_size})'
            )

    @property
    def n_crops(self) -> int:
        return self.n_global + self.n_local

    @property
    def kernel_size(self) -> int:
        return self.blur_kernel_size or 2 * math.ceil(3 * self.blur_sigma[1]) + 1

    def crop_specs(self) -> List[dict]:
        """Size, scale and per-crop probabilities of each crop, in output order."""
        g = dict(size=self.global_size, scale=self.global_scale)
        specs = [
            dict(g, blur_p=self.blur_p_global1, solarize_p=0.0),
            dict(g, blur_p=self.blur_p_global2, solarize_p=self.solarize_p),
        ]
        specs += [
            dict(size=self.local_size, scale=self.local_scale, blur_p=self.blur_p_local, solarize_p=0.0)
            for _ in range(self.n_local)
        ]
        return specs


# -- reference: torchvision.transforms.v2, one crop at a time -------------------------------------------
class TorchvisionMultiCrop:
    """image (PIL or uint8 tensor CxHxW) -> list of n_crops float tensors, normalised, by torchvision's own
    transforms; the reference for ``MultiCropTransform`` (same interface, several times slower)."""

    def __init__(self, cfg: Optional[MultiCropConfig] = None) -> None:
        self.cfg = cfg = cfg or MultiCropConfig()
        self.transforms = [self._crop_transform(spec) for spec in cfg.crop_specs()]

    def _crop_transform(self, spec: dict) -> v2.Compose:
        c = self.cfg
        steps = [
            v2.ToImage(),
            v2.RandomResizedCrop(
                spec['size'],
                scale=spec['scale'],
                ratio=c.ratio,
                interpolation=InterpolationMode.BICUBIC,
                antialias=True,
            ),
            v2.RandomHorizontalFlip(c.flip_p),
            v2.ToDtype(torch.float32, scale=True),
            v2.RandomApply([v2.ColorJitter(c.brightness, c.contrast, c.saturation, c.hue)], p=c.jitter_p),
            v2.RandomGrayscale(c.grayscale_p),
            v2.RandomApply([v2.GaussianBlur(c.kernel_size, sigma=c.blur_sigma)], p=spec['blur_p']),
        ]
        if spec['solarize_p'] > 0:
            steps.append(v2.RandomSolarize(c.solarize_threshold, p=spec['solarize_p']))
        steps.append(v2.Normalize(c.mean, c.std))
        return v2.Compose(steps)

    def __call__(self, image) -> List[torch.Tensor]:
        return [t(image) for t in self.transforms]


# -- device path: whole batches, per-sample random parameters --------------------------------------------
def _uniform(n: int, lo: float, hi: float, device, generator) -> torch.Tensor:
    return torch.rand(n, device=device, generator=generator) * (hi - lo) + lo


def _bernoulli(n: int, p: float, device, generator) -> torch.Tensor:
    return torch.rand(n, device=device, generator=generator) < p


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    # plane by plane: a weighted sum over the channel dimension is a slow strided reduction on CPU
    return torch.add(x[:, 0:1] * _GRAY[0], x[:, 1:2], alpha=_GRAY[1]).add_(x[:, 2:3], alpha=_GRAY[2])


@overload
def _per_sample(f: float) -> float: ...
@overload
def _per_sample(f: torch.Tensor) -> torch.Tensor: ...
def _per_sample(f: Union[float, torch.Tensor]) -> Union[float, torch.Tensor]:
    """Per-image factors (B,) broadcast over (B, C, H, W); a Python float (one image on the CPU) stays one, which
    spares the per-call overhead of tensor arithmetic on scalars."""
    return f if isinstance(f, float) else f.view(-1, 1, 1, 1)


def _adjust_brightness(x, f):
    return (x * _per_sample(f)).clamp_(0, 1)


def _adjust_contrast(x, f):
    # the mean of the grayscale image, as the luma-weighted sum of the channel means (cheaper than a gray image)
    mean = x.mean(dim=(2, 3), keepdim=True)
    mean = (
        mean
        if x.shape[1] == 1
        else torch.add(mean[:, 0:1] * _GRAY[0], mean[:, 1:2], alpha=_GRAY[1]).add_(mean[:, 2:3], alpha=_GRAY[2])
    )
    f = _per_sample(f)
    return (x * f).add_((1 - f) * mean).clamp_(0, 1)


def _adjust_saturation(x, f):
    if x.shape[1] == 1:
        return x
    f = _per_sample(f)
    # mul and add: lerp with a broadcast operand is several times slower on CPU
    return (x * f).add_(_gray(x) * (1 - f)).clamp_(0, 1)


def _equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1.0 where a == b, else 0.0, in a's dtype (written straight to float: converting a bool tensor is slow)."""
    return torch.eq(a, b, out=torch.empty_like(a))


_HUE_OFFSETS = torch.tensor((11.0, 9.0, 7.0)).view(1, 3, 1, 1) / 6  # (n_c + 6) / 6: positive before the frac


def _adjust_hue(x, f):
    """torchvision's adjust_hue (HSV hue rotation) in closed form: with M, m the per-pixel max and min, every
    channel is M - (M - m) * clamp(2 - |k - 2|, 0, 1), k = (n_c + 6 h) mod 6, n = (5, 3, 1) for (r, g, b).
    Built from ops that are fast on one CPU core: no where, remainder, bool conversion or reduction over channels."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    mx = torch.maximum(torch.maximum(r, g), b)
    delta = mx - torch.minimum(torch.minimum(r, g), b)
    safe = delta.clamp_min(1e-20)  # delta 0: the numerators below are 0 too, and the result is mx
    # 6h * delta where the max is b, else g, else r: torchvision's priority r, g, b on ties
    h6 = torch.lerp(torch.add(r - g, delta, alpha=4.0), torch.add(b - r, delta, alpha=2.0), _equal(g, mx))
    h6 = torch.lerp(h6, g - b, _equal(r, mx)).div_(safe)
    # u = ((n_c + 6h + 6f) mod 6) / 6 via frac of a positive number (+6), then the triangle 2 - |6u - 2| clamped
    u = torch.add(h6.mul_(1 / 6).add_(_per_sample(f)), _HUE_OFFSETS.to(x)).frac_()
    return torch.addcmul(mx, u.sub_(1 / 3).abs_().mul_(-6.0).add_(2.0).clamp_(0.0, 1.0), delta, value=-1.0)


class BatchedMultiCrop:
    """uint8 image batch on any device -> list of n_crops float batches (B, C, s, s), normalised.

    ``images``: (B, C, H, W) uint8. ``orig_sizes`` (optional, (B, 2) of (h, w)): the images' sizes before a
    loader resized them to this common canvas; crop boxes are drawn in that original pixel space so crop
    areas and aspect ratios follow RandomResizedCrop on the original image, then resampled from the canvas.
    Crop + resize + flip are one bicubic ``grid_sample`` per crop (no antialiasing: keep the canvas close to
    the crop sizes, e.g. 256 px, so that downscaling stays mild).
    """

    def __init__(self, cfg: Optional[MultiCropConfig] = None) -> None:
        self.cfg = cfg or MultiCropConfig()

    def __call__(
        self,
        images: torch.Tensor,
        orig_sizes: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> List[torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f'BatchedMultiCrop takes a (B, C, H, W) uint8 batch, got {images.dtype} {tuple(images.shape)}'
            )
        if images.shape[1] != len(self.cfg.mean):
            raise ValueError(f'images have {images.shape[1]} channels, the config normalises {len(self.cfg.mean)}')
        B, _, H, W = images.shape
        if orig_sizes is None:
            orig_sizes = torch.tensor([[H, W]], device=images.device).expand(B, 2)
        orig_sizes = orig_sizes.to(device=images.device, dtype=torch.float32)
        x = images.float().div_(255)
        return [self._crop(x, orig_sizes, spec, generator) for spec in self.cfg.crop_specs()]

    def _crop(self, x: torch.Tensor, sizes: torch.Tensor, spec: dict, gen) -> torch.Tensor:
        c, dev, B = self.cfg, x.device, x.shape[0]
        theta = self._crop_boxes(sizes, spec['scale'], gen)
        flip = _bernoulli(B, c.flip_p, dev, gen)
        theta[:, 0, 0] = torch.where(flip, -theta[:, 0, 0], theta[:, 0, 0])
        s = spec['size']
        grid = F.affine_grid(theta, [B, x.shape[1], s, s], align_corners=False)
        y = F.grid_sample(x, grid, mode='bicubic', padding_mode='border', align_corners=False).clamp_(0, 1)
        y = self._color_jitter(y, gen)
        gray = _bernoulli(B, c.grayscale_p, dev, gen)
        if y.shape[1] > 1:
            y = torch.where(_per_sample(gray), _gray(y).expand_as(y), y)
        y = self._blur(y, spec['blur_p'], gen)
        if spec['solarize_p'] > 0:
            sol = _per_sample(_bernoulli(B, spec['solarize_p'], dev, gen))
            y = torch.where(sol & (y >= c.solarize_threshold), 1.0 - y, y)
        mean = y.new_tensor(c.mean).view(1, -1, 1, 1)
        std = y.new_tensor(c.std).view(1, -1, 1, 1)
        return (y - mean) / std

    def _crop_boxes(
        self, sizes: torch.Tensor, scale: Tuple[float, float], gen, attempts: int = 10
    ) -> torch.Tensor:
        """RandomResizedCrop's box sampling (10 tries, then a centre crop), vectorised; returns affine thetas
        mapping output coordinates to normalised input coordinates."""
        c, dev, B = self.cfg, sizes.device, sizes.shape[0]
        Hs, Ws = sizes[:, 0:1], sizes[:, 1:2]
        lo, hi = scale
        area = Hs * Ws * _uniform(B * attempts, lo, hi, dev, gen).view(B, attempts)
        log_r = _uniform(B * attempts, math.log(c.ratio[0]), math.log(c.ratio[1]), dev, gen).view(B, attempts)
        r = torch.exp(log_r)
        w = torch.round(torch.sqrt(area * r))
        h = torch.round(torch.sqrt(area / r))
        ok = (w > 0) & (h > 0) & (w <= Ws) & (h <= Hs)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((B,), -1, device=dev))
        pick = first.clamp_min(0).view(B, 1)
        w, h = w.gather(1, pick).squeeze(1), h.gather(1, pick).squeeze(1)
        Hs, Ws = Hs.squeeze(1), Ws.squeeze(1)
        # fallback: centre crop at the ratio clamped into range (torchvision's behaviour)
        in_ratio = Ws / Hs
        fw = torch.where(
            in_ratio < c.ratio[0], Ws, torch.where(in_ratio > c.ratio[1], torch.round(Hs * c.ratio[1]), Ws)
        )
        fh = torch.where(in_ratio < c.ratio[0], torch.round(Ws / c.ratio[0]), Hs)
        fallback = first < 0
        w, h = torch.where(fallback, fw, w), torch.where(fallback, fh, h)
        u = torch.rand(B, 2, device=dev, generator=gen)
        top = torch.where(fallback, (Hs - h) / 2, torch.floor(u[:, 0] * (Hs - h + 1)))
        left = torch.where(fallback, (Ws - w) / 2, torch.floor(u[:, 1] * (Ws - w + 1)))
        theta = torch.zeros(B, 2, 3, device=dev)
        theta[:, 0, 0] = w / Ws
        theta[:, 0, 2] = (2 * left + w) / Ws - 1
        theta[:, 1, 1] = h / Hs
        theta[:, 1, 2] = (2 * top + h) / Hs - 1
        return theta

    def _color_jitter(self, x: torch.Tensor, gen) -> torch.Tensor:
        c, dev, B = self.cfg, x.device, x.shape[0]
        apply = _bernoulli(B, c.jitter_p, dev, gen)

        def factor(amount: float, center: float) -> torch.Tensor:
            f = _uniform(B, max(0.0, center - amount), center + amount, dev, gen)
            return torch.where(apply, f, torch.full_like(f, center))

        ops = [
            (_adjust_brightness, factor(c.brightness, 1.0), c.brightness > 0),
            (_adjust_contrast, factor(c.contrast, 1.0), c.contrast > 0),
            (_adjust_saturation, factor(c.saturation, 1.0), c.saturation > 0),
            (_adjust_hue, factor(c.hue, 0.0), c.hue > 0),
        ]
        # ColorJitter applies its four adjustments in a fresh random order for every image.
        order = torch.rand(B, 4, device=dev, generator=gen).argsort(dim=1)
        for slot in range(4):
            for j, (fn, f, enabled) in enumerate(ops):
                if enabled:
                    x = torch.where(_per_sample(order[:, slot] == j), fn(x, f), x)
        return x

    def _blur(self, x: torch.Tensor, p: float, gen) -> torch.Tensor:
        if p <= 0:
            return x
        c, dev = self.cfg, x.device
        B, C, H, W = x.shape
        apply = _bernoulli(B, p, dev, gen)
        sigma = _uniform(B, *c.blur_sigma, dev, gen)
        k = c.kernel_size
        r = torch.arange(k, device=dev, dtype=x.dtype) - (k - 1) / 2
        kernel = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
        kernel = kernel / kernel.sum(1, keepdim=True)
        delta = torch.zeros_like(kernel)
        delta[:, k // 2] = 1.0
        kernel = torch.where(apply[:, None], kernel, delta).repeat_interleave(C, dim=0)  # (B*C, k)
        y = x.reshape(1, B * C, H, W)
        pad = k // 2
        y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode='reflect'), kernel.view(B * C, 1, 1, k), groups=B * C)
        y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode='reflect'), kernel.view(B * C, 1, k, 1), groups=B * C)
        return y.view(B, C, H, W)


def stack_crops(per_image: Sequence[Sequence[torch.Tensor]]) -> List[torch.Tensor]:
    """Collate: list over images of lists of crops -> list over crops of (B, C, s, s) batches."""
    return [torch.stack(crops) for crops in zip(*per_image)]

"""DINO's multi-crop on one CPU core, fast: for data-loader workers.

The recipe is MultiCropConfig's, drawn as torchvision draws it (``TorchvisionMultiCrop`` is the reference), but
executed the cheap way:

- geometry on uint8: each crop is a strided view of the decoded image, resized by PyTorch's antialiased bicubic
  uint8 kernel (the one torchvision's ``resized_crop`` calls on uint8 tensors, so boxes give identical pixels),
  flipped on the small crop, then converted to float planes in [0, 255] as it is copied into its group's batch;
- photometry in float, crop by crop, in place, in each crop's own random order, in inference mode; hue by a
  closed-form HSV rotation, blur as separable shifted sums; one fused multiply-add normalises a group (the 1/255
  included) into ordinary tensors;
- all random numbers of an image from one ``torch.rand`` call on torch's default generator, so the reader's
  ``torch.manual_seed`` fixes the crops.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .multicrop import _GRAY, MultiCropConfig
from .multicrop import _gray as _batched_gray

# uniforms per crop: 10 (area, log-ratio) attempts, top, left, flip, jitter, 4 order keys, 4 factors, gray,
# blur, sigma, solarize
_ATTEMPTS = 10
_N_UNIFORM = 2 * _ATTEMPTS + 16
_BLUR_TAIL = 4.0  # taps beyond 4 sigma hold under 1e-4 of the kernel's mass: dropped


@dataclass
class CropPlan:
    """Every random choice for one crop: box (top, left, h, w) in source pixels, flip, colour-jitter factors and
    order (None: no jitter), grayscale, blur sigma (None: no blur), solarisation."""

    size: int
    box: Tuple[int, int, int, int]
    flip: bool
    jitter: Optional[Tuple[float, float, float, float]]  # brightness, contrast, saturation, hue
    order: Tuple[int, ...]
    gray: bool
    sigma: Optional[float]
    solarize: bool


def random_box(
    u_area: Sequence[float],
    u_ratio: Sequence[float],
    u_top: float,
    u_left: float,
    height: int,
    width: int,
    scale: Tuple[float, float],
    ratio: Tuple[float, float],
) -> Tuple[int, int, int, int]:
    """RandomResizedCrop.get_params from given uniforms: up to 10 (area, log aspect) tries, then a centre crop."""
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for ua, ur in zip(u_area, u_ratio):
        target = area * (scale[0] + ua * (scale[1] - scale[0]))
        aspect = math.exp(lo + ur * (hi - lo))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _span(u: float, amount: float, center: float) -> float:
    """ColorJitter's factor range: [max(0, center - amount), center + amount] (hue: [-amount, amount])."""
    lo = max(0.0, center - amount) if center else -amount
    return lo + u * (center + amount - lo)


def sample_plans(cfg: MultiCropConfig, height: int, width: int) -> List[CropPlan]:
    """The random choices of every crop of one image, from one draw of torch's default generator."""
    plans = []
    for spec, u in zip(cfg.crop_specs(), torch.rand(cfg.n_crops, _N_UNIFORM, dtype=torch.float64).tolist()):
        a = 2 * _ATTEMPTS
        box = random_box(u[:_ATTEMPTS], u[_ATTEMPTS:a], u[a], u[a + 1], height, width, spec['scale'], cfg.ratio)
        keys = u[a + 4 : a + 8]
        jitter = None
        if u[a + 3] < cfg.jitter_p:
            jitter = (
                _span(u[a + 8], cfg.brightness, 1.0),
                _span(u[a + 9], cfg.contrast, 1.0),
                _span(u[a + 10], cfg.saturation, 1.0),
                _span(u[a + 11], cfg.hue, 0.0),
            )
        sigma = None
        if u[a + 13] < spec['blur_p']:
            sigma = cfg.blur_sigma[0] + u[a + 14] * (cfg.blur_sigma[1] - cfg.blur_sigma[0])
        plans.append(
            CropPlan(
                size=spec['size'],
                box=box,
                flip=u[a + 2] < cfg.flip_p,
                jitter=jitter,
                order=tuple(sorted(range(4), key=keys.__getitem__)),
                gray=u[a + 12] < cfg.grayscale_p,
                sigma=sigma,
                solarize=u[a + 15] < spec['solarize_p'],
            )
        )
    return plans


def _as_hwc(image: Union[Image.Image, torch.Tensor]) -> torch.Tensor:
    """uint8 H x W x C view of a PIL image or a uint8 C x H x W tensor (torchvision's decoders already store
    their output channels-last, so the view costs nothing)."""
    if isinstance(image, Image.Image):
        array = np.array(image)
        return torch.from_numpy(array[..., None] if array.ndim == 2 else array)
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3:
        what = f'{image.dtype} tensor of shape {tuple(image.shape)}' if isinstance(image, torch.Tensor) else type(image)
        raise ValueError(f'MultiCropTransform takes a PIL image or a uint8 C x H x W tensor, got {what}')
    return image.permute(1, 2, 0)


def _resized_crop(hwc: torch.Tensor, plan: CropPlan) -> torch.Tensor:
    top, left, h, w = plan.box
    # a dense channels-last copy of the box first: the resize kernel reads it a quarter faster than the strided view
    box = hwc.narrow(0, top, h).narrow(1, left, w).permute(2, 0, 1).unsqueeze(0)
    crop = box.contiguous(memory_format=torch.channels_last)
    out = F.interpolate(crop, size=(plan.size, plan.size), mode='bicubic', antialias=True).squeeze(0)
    return out.flip(-1) if plan.flip else out


# -- photometry, in place on one float crop (C, H, W) in [0, 255] ------------------------------------------------
# Working in [0, 255] saves a pass over every pixel (the uint8 crop converts to float as it is copied, the 1/255
# goes into the normalisation). Each op writes into its crop (no allocation for the result, no copy back) and
# skips its clamp where the factor cannot leave [0, 255] (a factor <= 1 makes a convex combination of values in
# range). The device path (``multicrop.BatchedMultiCrop``) keeps the batched out-of-place ops of ``multicrop``.
_W0, _W1, _W2 = _GRAY
_HUE_OFFSETS = torch.tensor((11.0, 9.0, 7.0)).view(3, 1, 1) / 6  # (n_c + 6) / 6 for (r, g, b): positive before frac


def _brightness_(v: torch.Tensor, f: float) -> torch.Tensor:
    v.mul_(f)
    return v.clamp_(0.0, 255.0) if f > 1.0 else v


def _contrast_(v: torch.Tensor, f: float) -> torch.Tensor:
    """torchvision's adjust_contrast: blend with the mean of the grayscale image (the luma-weighted channel means)."""
    if v.shape[0] == 1:
        mean = v.mean().item()
    else:
        m = v.mean(dim=(1, 2)).tolist()
        mean = _W0 * m[0] + _W1 * m[1] + _W2 * m[2]
    v.mul_(f).add_((1.0 - f) * mean)
    return v.clamp_(0.0, 255.0) if f > 1.0 else v


def _saturation_(v: torch.Tensor, f: float) -> torch.Tensor:
    """torchvision's adjust_saturation: blend with the grayscale image, its weights scaled by (1 - f) on the way."""
    if v.shape[0] == 1:
        return v
    g = 1.0 - f
    r, gr, b = v.unbind(0)
    gray = torch.add(r * (_W0 * g), gr, alpha=_W1 * g).add_(b, alpha=_W2 * g)
    v.mul_(f).add_(gray)
    return v.clamp_(0.0, 255.0) if f > 1.0 else v


def _hue_(v: torch.Tensor, f: float) -> torch.Tensor:
    """torchvision's adjust_hue (HSV hue rotation), the closed form of ``multicrop._adjust_hue`` rearranged for
    fewer passes: with M, m the per-pixel max and min, d = M - m and u = frac(h + f + (n_c + 6) / 6), every channel
    is M - d * clamp(2 - |6u - 2|, 0, 1) = (M - 2d) + 6d * clamp(|u - 1/3|, 1/6, 1/3). The hue h of the max channel's
    formula: on ties the formulas agree (the hexcone is continuous), so no priority is needed."""
    if v.shape[0] == 1:
        return v
    r, g, b = v[0], v[1], v[2]
    mx = torch.maximum(r, g)
    mx = torch.maximum(mx, b, out=mx)
    mn = torch.minimum(r, g)
    d = torch.sub(mx, torch.minimum(mn, b, out=mn), out=mn)
    # 6h * d where the max is b, else g, else r (lerp with a 0/1 mask written straight to float: no where)
    h6 = torch.lerp(
        torch.add(r - g, d, alpha=4.0), torch.add(b - r, d, alpha=2.0), torch.eq(g, mx, out=torch.empty_like(g))
    )
    h6 = torch.lerp(h6, g - b, torch.eq(r, mx, out=torch.empty_like(r)))
    h = h6.div_(d.clamp_min(1e-20).mul_(6.0)).add_(f)  # d 0: the numerators are 0 too, and every channel is M
    w = torch.add(h, _HUE_OFFSETS).frac_().sub_(1 / 3).abs_().clamp_(1 / 6, 1 / 3)
    return torch.addcmul(torch.add(mx, d, alpha=-2.0), w, d, value=6.0, out=v)


def _gray(v: torch.Tensor) -> torch.Tensor:
    """The luma plane (1, H, W) of v (C, H, W): torchvision's rgb_to_grayscale, whose channels are all this plane
    (v itself when it has one channel)."""
    return v if v.shape[0] == 1 else _batched_gray(v.unsqueeze(0)).squeeze(0)


_JITTER_OPS = (_brightness_, _contrast_, _saturation_, _hue_)
_IDENTITY = (1.0, 1.0, 1.0, 0.0)  # factors that leave the image as it is (a jitter amount of 0 always draws them)


def _taps(sigma: float, kernel_size: int, radius: int) -> List[float]:
    """torchvision's GaussianBlur kernel for sigma (normalised over kernel_size taps), its central 2 radius + 1 taps;
    computed in Python: a dozen numbers, where torch's per-call overhead would dominate."""
    half = (kernel_size - 1) / 2
    w = [math.exp(-((i - half) ** 2) / (2 * sigma**2)) for i in range(kernel_size)]
    total = sum(w)
    mid = kernel_size // 2
    return [x / total for x in w[mid - radius : mid + radius + 1]]


def _blur_(v: torch.Tensor, sigma: float, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur of v (C, H, W, contiguous) in place, with reflect padding, as torchvision's
    gaussian_blur, as shifted sums over the taps within 4 sigma."""
    C, H, W = v.shape
    radius = min(kernel_size // 2, math.ceil(_BLUR_TAIL * sigma))
    taps = _taps(sigma, kernel_size, radius)
    if radius == 0:
        return v.mul_(taps[0])
    if radius >= min(H, W):
        raise ValueError(f'blur radius {radius} needs crops larger than {H}x{W} px (reflect padding)')
    # one reflect padding on both axes; rows: shifts of the flattened padded image are contiguous, and each shifted
    # sum runs into the next row only in the 2 * radius padding columns, never read; the padding rows are blurred
    # along too (a row's reflection blurred is the blurred row's reflection), so the column pass needs no padding
    # of its own and writes into v, from views of the row pass's output shifted by whole rows
    padded = F.pad(v, (radius, radius, radius, radius), mode='reflect')
    flat = padded.view(-1)
    length = flat.numel() - 2 * radius
    rows = torch.empty_like(padded)
    shifted = flat.unfold(0, length, 1).unbind(0)  # the 2 radius + 1 shifts as views, in one call
    acc = torch.mul(shifted[0], taps[0], out=rows.view(-1)[:length])
    for k in range(1, len(taps)):
        acc.add_(shifted[k], alpha=taps[k])
    shifted = rows[..., :W].unfold(1, H, 1).permute(1, 0, 3, 2).unbind(0)  # (C, H, W) views, k rows down
    z = torch.mul(shifted[0], taps[0], out=v)
    for k in range(1, len(taps)):
        z.add_(shifted[k], alpha=taps[k])
    return v


def _solarize_(v: torch.Tensor, threshold: float) -> torch.Tensor:
    """255 - v where v >= threshold (torchvision's solarize, on [0, 255]), without the slow ``where``."""
    above = torch.ge(v, threshold, out=torch.empty_like(v))
    return v.addcmul_(above, v.mul(-2.0).add_(255.0))


class MultiCropTransform:
    """image (PIL or uint8 tensor C x H x W) -> list of n_crops float tensors, normalised; for loader workers.

    Same recipe and same distribution of every random choice as ``TorchvisionMultiCrop`` (torchvision's ops,
    crop by crop), several times faster per core."""

    def __init__(self, cfg: Optional[MultiCropConfig] = None) -> None:
        self.cfg = cfg = cfg or MultiCropConfig()
        std = torch.tensor(cfg.std, dtype=torch.float32)
        # normalisation of [0, 255] values: x * scale + shift = (x / 255 - mean) / std
        self.scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
        self.shift = (-torch.tensor(cfg.mean, dtype=torch.float32) / std).view(1, -1, 1, 1)

    def __call__(self, image: Union[Image.Image, torch.Tensor]) -> List[torch.Tensor]:
        hwc = _as_hwc(image)
        channels = hwc.shape[-1]
        if channels != len(self.cfg.mean):
            raise ValueError(f'image has {channels} channels, the config normalises {len(self.cfg.mean)}')
        plans = sample_plans(self.cfg, hwc.shape[0], hwc.shape[1])
        out: List[torch.Tensor] = []
        for size in dict.fromkeys(p.size for p in plans):  # globals, then locals (crop_specs' order)
            group = [p for p in plans if p.size == size]
            # inference mode spares every op its autograd bookkeeping (about 5 % of the time here); the crops leave
            # it through the normalisation, made outside, so that they are ordinary tensors (trainable, writable)
            with torch.inference_mode():
                x = torch.empty(len(group), channels, size, size)
                for v, plan in zip(x, group):
                    v.copy_(_resized_crop(hwc, plan))  # uint8 channels-last -> float planes, in one pass
                    self._photometric(v, plan)
            out.extend(torch.addcmul(self.shift, x, self.scale).unbind(0))
        return out

    def _photometric(self, v: torch.Tensor, plan: CropPlan) -> None:
        """ColorJitter in the crop's own random order, grayscale, blur, solarisation: in place on v, in [0, 255]."""
        c = self.cfg
        if plan.jitter is not None:
            for op_id in plan.order:
                if plan.jitter[op_id] != _IDENTITY[op_id]:
                    _JITTER_OPS[op_id](v, plan.jitter[op_id])
        # a grayscale crop is blurred and solarised as its one luma plane, then copied to every channel
        x = _gray(v) if plan.gray else v
        if plan.sigma is not None:
            _blur_(x, plan.sigma, c.kernel_size)
        if plan.solarize:
            _solarize_(x, c.solarize_threshold * 255.0)
        if x is not v:
            v.copy_(x.expand_as(v))

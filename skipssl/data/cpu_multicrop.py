"""DINO's multi-crop on one CPU core, fast: for data-loader workers.

The recipe is MultiCropConfig's, drawn as torchvision draws it (``TorchvisionMultiCrop`` is the reference), but
executed the cheap way:

- geometry on uint8: each crop is a strided view of the decoded image, resized by PyTorch's antialiased bicubic
  uint8 kernel (the one torchvision's ``resized_crop`` calls on uint8 tensors, so boxes give identical pixels),
  flipped on the small crop;
- photometry in float, once per group of same-size crops (the 2 globals, the N locals), each op applied only to
  the crops that drew it, in each crop's own random order; hue by a closed-form HSV rotation
  (``multicrop._adjust_hue``), blur as per-crop separable shifted sums;
- all random numbers of an image from one ``torch.rand`` call on torch's default generator, so the reader's
  ``torch.manual_seed`` fixes the crops.
"""

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .multicrop import MultiCropConfig, _adjust_brightness, _adjust_contrast, _adjust_hue, _adjust_saturation, _gray

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
    crop = hwc[top : top + h, left : left + w].permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
    out = F.interpolate(crop, size=(plan.size, plan.size), mode='bicubic', antialias=True)[0]
    return out.flip(-1) if plan.flip else out


_JITTER_OPS = (_adjust_brightness, _adjust_contrast, _adjust_saturation, _adjust_hue)
_IDENTITY = (1.0, 1.0, 1.0, 0.0)  # factors that leave the image as it is (a jitter amount of 0 always draws them)


def _apply(x: torch.Tensor, idx: List[int], fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x with fn applied to the images idx (sorted); a run of neighbours is a view, so no gather or scatter."""
    if len(idx) == x.shape[0]:
        return fn(x)
    if idx[-1] - idx[0] == len(idx) - 1:
        x[idx[0] : idx[-1] + 1] = fn(x[idx[0] : idx[-1] + 1])
    else:
        x[idx] = fn(x[idx])
    return x


def _jitter(x: torch.Tensor, plans: Sequence[CropPlan]) -> torch.Tensor:
    """ColorJitter crop by crop, each in its own random order, on views of x written back (grouping the crops
    that share an op in a slot was slower: the gathers and scatters cost more than the calls they save)."""
    for i, plan in enumerate(plans):
        if plan.jitter is None:
            continue
        v = x[i : i + 1]
        for op_id in plan.order:
            if plan.jitter[op_id] != _IDENTITY[op_id]:
                v = _JITTER_OPS[op_id](v, plan.jitter[op_id])
        x[i : i + 1] = v
    return x


def blur_kernels(sigmas: Sequence[float], kernel_size: int) -> torch.Tensor:
    """(n, kernel_size) normalised Gaussian taps, torchvision's GaussianBlur kernel for each sigma (computed in
    Python: a dozen numbers, where torch's per-call overhead would dominate)."""
    half = (kernel_size - 1) / 2
    rows = []
    for sigma in sigmas:
        w = [math.exp(-((i - half) ** 2) / (2 * sigma**2)) for i in range(kernel_size)]
        total = sum(w)
        rows.append([v / total for v in w])
    return torch.tensor(rows, dtype=torch.float32)


def _blur(x: torch.Tensor, sigma: float, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur of x (C, H, W) with reflect padding, as torchvision's gaussian_blur, as shifted
    sums over the taps within 4 sigma."""
    C, H, W = x.shape
    half = kernel_size // 2
    radius = min(half, math.ceil(_BLUR_TAIL * sigma))
    taps = blur_kernels([sigma], kernel_size)[0, half - radius : half + radius + 1].tolist()
    if radius == 0:
        return x * taps[0]
    if radius >= min(H, W):
        raise ValueError(f'blur radius {radius} needs crops larger than {H}x{W} px (reflect padding)')
    # rows: shifts of the flattened padded image are contiguous; each shifted sum runs into the next row only in
    # the 2 * radius padding columns, which are dropped
    flat = F.pad(x, (radius, radius, 0, 0), mode='reflect').view(-1)
    length = flat.numel() - 2 * radius
    rows = torch.empty_like(flat)
    torch.mul(flat[:length], taps[0], out=rows[:length])
    for k in range(1, len(taps)):
        rows[:length].add_(flat[k : k + length], alpha=taps[k])
    y = F.pad(rows.view(C, H, W + 2 * radius)[..., :W], (0, 0, radius, radius), mode='reflect').view(C, -1)
    length = H * W
    z = y[:, :length] * taps[0]
    for k in range(1, len(taps)):
        z.add_(y[:, k * W : k * W + length], alpha=taps[k])
    return z.view(C, H, W)


def _solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """1 - x where x >= threshold (torchvision's solarize on [0, 1] images), without the slow ``where``."""
    above = torch.ge(x, threshold, out=torch.empty_like(x))
    return x.addcmul_(above, 1.0 - 2.0 * x)


class MultiCropTransform:
    """image (PIL or uint8 tensor C x H x W) -> list of n_crops float tensors, normalised; for loader workers.

    Same recipe and same distribution of every random choice as ``TorchvisionMultiCrop`` (torchvision's ops,
    crop by crop), several times faster per core."""

    def __init__(self, cfg: Optional[MultiCropConfig] = None) -> None:
        self.cfg = cfg = cfg or MultiCropConfig()
        self.mean = torch.tensor(cfg.mean).view(1, -1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(cfg.std).view(1, -1, 1, 1)

    def __call__(self, image: Union[Image.Image, torch.Tensor]) -> List[torch.Tensor]:
        hwc = _as_hwc(image)
        if hwc.shape[-1] != len(self.cfg.mean):
            raise ValueError(f'image has {hwc.shape[-1]} channels, the config normalises {len(self.cfg.mean)}')
        plans = sample_plans(self.cfg, hwc.shape[0], hwc.shape[1])
        out: List[torch.Tensor] = []
        for size in dict.fromkeys(p.size for p in plans):  # globals, then locals (crop_specs' order)
            group = [p for p in plans if p.size == size]
            out.extend(self._photometric(torch.stack([_resized_crop(hwc, p) for p in group]), group).unbind(0))
        return out

    def _photometric(self, crops: torch.Tensor, plans: Sequence[CropPlan]) -> torch.Tensor:
        c = self.cfg
        x = _jitter(crops * (1 / 255), plans)  # uint8 times a float: float32 in one pass
        gray = [i for i, p in enumerate(plans) if p.gray]
        if gray and x.shape[1] > 1:
            x = _apply(x, gray, lambda v: _gray(v).expand_as(v).contiguous())
        blur = [i for i, p in enumerate(plans) if p.sigma is not None]
        if blur:
            for i in blur:
                sigma = plans[i].sigma
                assert sigma is not None  # the plans picked for blur
                x[i] = _blur(x[i], sigma, c.kernel_size)
        sol = [i for i, p in enumerate(plans) if p.solarize]
        if sol:
            x = _apply(x, sol, lambda v: _solarize(v, c.solarize_threshold))
        return x.sub_(self.mean).mul_(self.inv_std)

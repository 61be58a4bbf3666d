"""The last block's CLS attention as DINO's users know it from DINO's ``visualize_attention.py``: per head, the
class token's attention over the patches, upsampled onto the image (nearest, one patch to a patch-sized
square), and the mask of the patches that hold ``keep`` (DINO: 60%) of that head's attention mass.

Used by the trainer's TensorBoard images and by the command::

    python -m skipssl.analysis.attention --checkpoint runs/NAME --image photo.jpg [--image ...] --out attn/

which takes what the evaluators take (a run, a checkpoint folder, an exported ``.safetensors``, a timm name)
and writes one PNG per image: a row per head, the heat map over the image and the 60% mask.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models import get_last_selfattention


def token_grid(model: nn.Module, x: torch.Tensor) -> Tuple[int, int]:
    pe = model.patch_embed
    if getattr(model, 'dynamic_img_size', False):
        return tuple(pe.dynamic_feat_size((x.shape[-2], x.shape[-1])))
    return tuple(pe.grid_size)


@torch.no_grad()
def cls_attention_maps(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, heads, h, w): the last block's attention of the class token to each patch (prefix tokens left out)."""
    attn = get_last_selfattention(model, x)
    h, w = token_grid(model, x)
    return attn[:, :, 0, model.num_prefix_tokens :].reshape(attn.shape[0], attn.shape[1], h, w).float()


def mass_masks(maps: torch.Tensor, keep: float = 0.6) -> torch.Tensor:
    """Per map, the patches with the largest attention whose share of the map's mass first exceeds ``keep``:
    DINO sorts ascending, normalises, and keeps where the cumulative share passes ``1 - keep``."""
    flat = maps.flatten(-2)
    val, idx = flat.sort(dim=-1)
    share = val / val.sum(dim=-1, keepdim=True)
    kept = share.cumsum(dim=-1) > (1 - keep)
    return torch.zeros_like(kept).scatter_(-1, idx, kept).view_as(maps)


def render(images: torch.Tensor, maps: torch.Tensor, masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``images`` (B, C, H, W) in [0, 1]; ``maps`` and ``masks`` (B, heads, h, w). Returns (overlays, masked),
    each (B * heads, 3, H, W) in [0, 1]: the head's map (scaled to its own range) as a heat colour blended
    with the image, and the image dimmed outside the head's mask."""
    B, heads = maps.shape[:2]
    size = images.shape[-2:]
    rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]
    rgb = rgb.repeat_interleave(heads, dim=0)
    up = F.interpolate(maps.reshape(B * heads, 1, *maps.shape[-2:]), size=size, mode='nearest')
    lo, hi = up.amin(dim=(2, 3), keepdim=True), up.amax(dim=(2, 3), keepdim=True)
    heat = (up - lo) / (hi - lo).clamp_min(1e-12)
    colour = torch.cat(
        [heat.clamp(max=0.5) * 2, (heat - 0.5).clamp(min=0) * 2, 1 - heat], dim=1
    )  # blue -> red -> yellow
    overlays = 0.5 * rgb + 0.5 * colour
    inside = F.interpolate(masks.reshape(B * heads, 1, *masks.shape[-2:]).float(), size=size, mode='nearest')
    masked = rgb * (0.2 + 0.8 * inside)
    return overlays.clamp(0, 1), masked.clamp(0, 1)


# -- the command -----------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m skipssl.analysis.attention', description=__doc__.split('\n\n')[0])
    p.add_argument('--checkpoint', required=True, help='run folder, checkpoint folder, .safetensors or timm name')
    p.add_argument('--image', action='append', required=True, help='an image file (repeat for several)')
    p.add_argument('--out', default='attention', help='output folder (default ./attention)')
    p.add_argument('--keep', type=float, default=0.6, help="share of each head's attention mass the mask keeps")
    p.add_argument('--which', choices=('teacher', 'student'), default='teacher')
    p.add_argument('--model-kwargs', type=json.loads, default=None, help='JSON kwargs of a random-init timm model')
    p.add_argument('--seed', type=int, default=0, help='random-init seed')
    for flag in ('--channels', '--resize', '--crop'):
        p.add_argument(flag, type=int, default=None)
    p.add_argument('--mean', type=float, nargs='+', default=None)
    p.add_argument('--std', type=float, nargs='+', default=None)
    return p.parse_args(argv)


def render_files(args: argparse.Namespace) -> None:
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.utils import save_image

    from eval.errors import EvalError
    from eval.source import PIXELS, check_channels, data_settings, load_model, preprocessing_flags
    from skipssl.data import eval_transform

    if not 0 < args.keep < 1:
        raise EvalError(f'--keep {args.keep}: a share of the attention mass, in (0, 1)')
    missing = [p for p in args.image if not Path(p).is_file()]
    if missing:
        raise EvalError(f'--image {missing[0]}: no such file')
    if args.checkpoint == PIXELS:
        raise EvalError('--checkpoint pixels has no attention; give a ViT')
    module, info = load_model(args.checkpoint, which=args.which, seed=args.seed, model_kwargs=args.model_kwargs)
    if not getattr(module, 'has_class_token', False):
        raise EvalError(f'{args.checkpoint}: the model has no class token to take attention maps from')
    data = data_settings(info, preprocessing_flags(args))
    check_channels(module, info, data['channels'])
    mode = ImageReadMode.GRAY if data['channels'] == 1 else ImageReadMode.RGB
    tf = eval_transform(data['eval_resize'], data['eval_crop'], data['mean'], data['std'])
    mean = torch.tensor(data['mean']).view(1, -1, 1, 1)
    std = torch.tensor(data['std']).view(1, -1, 1, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    module.eval()
    for path in args.image:
        try:
            image = decode_image(str(path), mode=mode)
        except RuntimeError as exn:
            raise EvalError(f'--image {path}: cannot decode it ({exn})') from exn
        x = tf(image).unsqueeze(0)
        maps = cls_attention_maps(module, x)
        overlays, masked = render(x * std + mean, maps, mass_masks(maps, args.keep))
        grid = torch.stack([overlays, masked], dim=1).flatten(0, 1)  # per head: heat map, mask
        target = out / f'{Path(path).stem}-attention.png'
        save_image(grid, target, nrow=2, padding=2)
        print(f'{path}: {maps.shape[1]} heads, {int(args.keep * 100)}% mass masks -> {target}')


def main(argv: Optional[Sequence[str]] = None) -> int:
    from eval.cli import run

    return run('skipssl.analysis.attention', render_files, {'args': parse_args(argv)})


if __name__ == '__main__':
    sys.exit(main())

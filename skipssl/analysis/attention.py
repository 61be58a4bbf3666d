"""The last block's CLS attention as DINO's users know it from DINO's ``visualize_attention.py``: per head, the
class token's attention over the patches, upsampled onto the image (nearest, one patch to a patch-sized
square), and the mask of the patches that hold ``keep`` (DINO: 60%) of that head's attention mass.

Used by the trainer's TensorBoard images and by the command :mod:`skipssl_eval.attention` (``skipssl-attention``).
"""

from typing import Tuple, cast

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..models import get_last_selfattention


def token_grid(model: nn.Module, x: torch.Tensor) -> Tuple[int, int]:
    pe = cast(PatchEmbed, model.patch_embed)  # a timm ViT's
    if getattr(model, 'dynamic_img_size', False):
        h, w = pe.dynamic_feat_size((x.shape[-2], x.shape[-1]))
    else:
        h, w = pe.grid_size
    return h, w


@torch.no_grad()
def cls_attention_maps(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, heads, h, w): the last block's attention of the class token to each patch (prefix tokens left out)."""
    vit = cast(VisionTransformer, model)  # timm's ViT or a SkipAt ViT, whose API get_last_selfattention uses
    attn = get_last_selfattention(vit, x)
    h, w = token_grid(vit, x)
    return attn[:, :, 0, vit.num_prefix_tokens :].reshape(attn.shape[0], attn.shape[1], h, w).float()


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

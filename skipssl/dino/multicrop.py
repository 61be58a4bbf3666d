"""Backbone + head over a list of crops, one backbone pass per resolution."""

from typing import List, Sequence

import torch
from torch import nn


class MultiCropWrapper(nn.Module):
    """Runs ``backbone`` once on each run of consecutive same-resolution crops and ``head`` once on all.

    ``crops`` is a list of (B, C, H, W) tensors in crop order (global crops first, then local crops); the
    output is (n_crops * B, out_dim), crop-major, as DINOLoss expects. The backbone must return one feature
    vector per image (e.g. a timm ViT with ``num_classes=0``: the CLS token after the final norm).
    """

    backbone: nn.Module
    head: nn.Module

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        feats: List[torch.Tensor] = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            group = crops[start] if end == start + 1 else torch.cat(list(crops[start:end]))
            feats.append(self.backbone(group))
            start = end
        return self.head(torch.cat(feats) if len(feats) > 1 else feats[0])

"""SkipAt's parametric function Phi: what a skipped block applies instead of self-attention.

Phi maps the previous block's MSA output (patch tokens only) to an approximation of this block's MSA
output (Venkataramanan et al., ICLR 2024): FC1 d->2d + GELU, depth-wise 5x5 conv + GELU on the
token grid, FC2 2d->d, then efficient channel attention (ECA).
"""

from typing import Tuple, Type

import torch
from torch import nn


class EfficientChannelAttention(nn.Module):
    """ECA (Wang et al., CVPR 2020) on tokens: a 1-D conv across channels of the token mean gates each channel."""

    def __init__(self, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f'ECA kernel_size must be odd, got {kernel_size}')
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        gate = self.conv(x.mean(dim=1, keepdim=True))  # (B, 1, C): channels are the conv's length axis
        return x * gate.sigmoid()


class SkipAttentionPhi(nn.Module):
    """Phi(Z_prev) for the patch tokens of one skipped block (Venkataramanan et al., ICLR 2024, section 3, and
    the authors' evaluation code): FC1 d -> 2d + GELU, depth-wise 5x5 conv + GELU on the token grid, FC2 2d -> d,
    ECA channel gate; see docs/models.md.

    Works on the true (h, w) token grid of each input, so it serves 224 px, 96 px and non-square crops.
    """

    def __init__(
        self,
        dim: int,
        hidden_ratio: float = 2.0,
        kernel_size: int = 5,
        eca_kernel_size: int = 3,
        act_layer: Type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        hidden = int(dim * hidden_ratio)
        if hidden < 1:
            raise ValueError(f'phi_hidden_ratio {hidden_ratio} leaves Phi no hidden channel at width {dim}')
        self.fc1 = nn.Linear(dim, hidden)
        self.act1 = act_layer()
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=True)
        self.act2 = act_layer()
        self.fc2 = nn.Linear(hidden, dim)
        self.eca = EfficientChannelAttention(eca_kernel_size)

    def forward(self, x: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        B, N, _ = x.shape
        H, W = grid_size
        # under torch.fx the sizes are traced values, which Python control flow cannot use: checked when concrete
        if isinstance(N, int) and isinstance(H, int) and isinstance(W, int) and N != H * W:
            raise ValueError(f'Phi got {N} patch tokens for a {H}x{W} grid')
        x = self.act1(self.fc1(x))
        C = x.shape[-1]
        # (B, N, C) is NHWC memory: the permuted view is a channels-last NCHW tensor, no copy.
        x = x.view(B, H, W, C).permute(0, 3, 1, 2)
        x = self.act2(self.dwconv(x))
        x = x.permute(0, 2, 3, 1).reshape(B, N, C)
        x = self.fc2(x)
        return self.eca(x)

"""Which attention kernel a timm ViT (or SkipAt-ViT) runs: fused or explicit.

'fused' is timm's default: ``F.scaled_dot_product_attention``, which on GPUs (FlashAttention, memory-efficient
attention) and on CPUs never writes the N x N attention matrix to memory. 'explicit' is how timm 0.5.4, which
SkipAt's paper measured with, computed it: q k^T / sqrt(d), its softmax materialised, then its product with v.
Both give the same outputs to float rounding; they differ in time and memory, and with them in what skipping
attention saves, so a SkipAt-against-ViT comparison should run both models on the same kind.
"""

from typing import Tuple

from timm.layers import Attention
from torch import nn

ATTENTION_KINDS: Tuple[str, ...] = ('fused', 'explicit')


def check_attention_kind(kind: str) -> str:
    if kind not in ATTENTION_KINDS:
        raise ValueError(f'attention kind must be fused or explicit, got {kind!r}')
    return kind


def set_attention(model: nn.Module, kind: str) -> int:
    """Make every timm ``Attention`` in ``model`` compute ``kind`` attention; returns how many it set.

    timm's ``Attention.fused_attn`` picks the path at each call, so this works on a built model (weights are
    untouched) and on copies made afterwards (the DINO teacher). Set it before ``torch.compile`` or scripting,
    which read it as a constant.
    """
    check_attention_kind(kind)
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    for m in modules:
        m.fused_attn = kind == 'fused'  # type: ignore[misc]  # Final for TorchScript; set before any scripting
    return len(modules)

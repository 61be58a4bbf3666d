"""Backbones: SkipAt Vision Transformers built on timm (importing this registers them with timm)."""

from . import registry  # noqa: F401  (registers vit_*_patch16_skipat_224 with timm)
from .attention import ATTENTION_KINDS, set_attention
from .complexity import count_macs, count_params
from .phi import EfficientChannelAttention, SkipAttentionPhi
from .skipat_vit import (
    DEFAULT_SKIP_INDICES,
    SkipAttentionBlock,
    SkipAtVisionTransformer,
    attention_probabilities,
    convert_to_skipat,
    get_last_selfattention,
    last_cls_tokens,
    validate_skip_indices,
)

__all__ = [
    'ATTENTION_KINDS',
    'DEFAULT_SKIP_INDICES',
    'EfficientChannelAttention',
    'SkipAtVisionTransformer',
    'SkipAttentionBlock',
    'SkipAttentionPhi',
    'attention_probabilities',
    'convert_to_skipat',
    'count_macs',
    'count_params',
    'get_last_selfattention',
    'last_cls_tokens',
    'set_attention',
    'validate_skip_indices',
]

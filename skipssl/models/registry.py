"""SkipAt-ViT entries in timm's model registry (``timm.create_model('vit_small_patch16_skipat_224')``).

The names follow timm's ViT variants (``vit_{size}_patch{p}_{variant}_{res}``), which timm's own model tests
recognise as token-output ViTs. The first names, ``skipat_vit_{size}_patch16_224``, stay as deprecated aliases
(timm warns and builds the current model), so configs and exports that name them still load.
"""

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, register_model_deprecations
from timm.models.vision_transformer import checkpoint_filter_fn

from .skipat_vit import SkipAtVisionTransformer


def _cfg(**kwargs: Any) -> dict:
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        'vit_tiny_patch16_skipat_224': _cfg(),
        'vit_small_patch16_skipat_224': _cfg(),
        'vit_base_patch16_skipat_224': _cfg(),
    }
)


_SOURCES = ('file', 'url', 'hf_hub_id', 'state_dict')


def _create(variant: str, pretrained: bool, **kwargs: Any) -> SkipAtVisionTransformer:
    # Nothing is published, so pretrained=True needs a source named in the pretrained config, as timm's
    # convention for local weights has it: pretrained_cfg_overlay=dict(file='teacher.safetensors'). Without one
    # timm would warn and go on with random weights; here that is an error.
    sources = {**(kwargs.get('pretrained_cfg') or {}), **(kwargs.get('pretrained_cfg_overlay') or {})}
    if isinstance(kwargs.get('pretrained_cfg'), str):
        sources = dict(kwargs.get('pretrained_cfg_overlay') or {})
    if pretrained and not any(sources.get(key) for key in _SOURCES):
        raise ValueError(
            f'no pretrained weights are published for {variant}: name a file, e.g. timm.create_model('
            f"'{variant}', pretrained=True, pretrained_cfg_overlay=dict(file='teacher.safetensors'), num_classes=0), "
            "or build it from a pretrained ViT with skipssl.models.convert_to_skipat(timm.create_model('vit_...', "
            'pretrained=True))'
        )
    # DINO feeds 224 and 96 px crops through one network, so inputs of any size are the default.
    kwargs.setdefault('dynamic_img_size', True)
    return build_model_with_cfg(
        SkipAtVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls='getter'),
        **kwargs,
    )


@register_model
def vit_tiny_patch16_skipat_224(pretrained: bool = False, **kwargs: Any) -> SkipAtVisionTransformer:
    """SkipAt-ViT-T/16: ViT-T/16 with blocks 3-8 skipping self-attention."""
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create('vit_tiny_patch16_skipat_224', pretrained, **dict(args, **kwargs))


@register_model
def vit_small_patch16_skipat_224(pretrained: bool = False, **kwargs: Any) -> SkipAtVisionTransformer:
    """SkipAt-ViT-S/16: ViT-S/16 with blocks 3-8 skipping self-attention."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create('vit_small_patch16_skipat_224', pretrained, **dict(args, **kwargs))


@register_model
def vit_base_patch16_skipat_224(pretrained: bool = False, **kwargs: Any) -> SkipAtVisionTransformer:
    """SkipAt-ViT-B/16: ViT-B/16 with blocks 3-8 skipping self-attention."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create('vit_base_patch16_skipat_224', pretrained, **dict(args, **kwargs))


register_model_deprecations(
    __name__, {f'skipat_vit_{size}_patch16_224': f'vit_{size}_patch16_skipat_224' for size in ('tiny', 'small', 'base')}
)

"""SkipAt Vision Transformer on top of timm's VisionTransformer.

Blocks listed in ``skip_indices`` drop their self-attention (no attention parameters are built, so DDP
and ZeRO see no unused parameters) and apply ``SkipAttentionPhi`` to the previous block's MSA output.
Everything else (patch embedding, position-embedding resampling, SDPA attention, MLP, drop-path, init,
intermediates API) is timm's.
"""

import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch
from timm.layers.format import Format
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.vision_transformer import Block, VisionTransformer, init_weights_vit_timm
from torch import nn

from .phi import SkipAttentionPhi

DEFAULT_SKIP_INDICES = (3, 4, 5, 6, 7, 8)


class SkipAttentionBlock(nn.Module):
    """A transformer block whose MSA is replaced by Phi of the previous block's MSA output.

    ``forward(x, z_prev, grid_size)`` returns ``(x, z)`` where ``z`` is this block's stand-in MSA output:
    the prefix rows (CLS, registers) of ``z_prev`` unchanged, followed by Phi of its patch rows.
    The residual structure and the MLP of the original block are kept.
    """

    def __init__(self, block: Block, num_prefix_tokens: int, phi: SkipAttentionPhi) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.phi = phi
        # Taken over from the original block; its norm1 and attn are dropped.
        self.ls1 = block.ls1
        self.drop_path1 = block.drop_path1
        self.norm2 = block.norm2
        self.mlp = block.mlp
        self.ls2 = block.ls2
        self.drop_path2 = block.drop_path2

    def forward(
        self,
        x: torch.Tensor,
        z_prev: Optional[torch.Tensor],
        grid_size: Tuple[int, int],
        attn_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        assert z_prev is not None, "a skipped block needs the previous block's MSA output"
        p = self.num_prefix_tokens
        z = self.phi(z_prev[:, p:], grid_size)
        if p:
            z = torch.cat([z_prev[:, :p], z], dim=1)
        x = x + self.drop_path1(self.ls1(z))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, z


class AttentionBlock(Block):
    """timm's Block as a SkipAt model holds it: the same parameters and computation, with the block interface
    of :class:`SkipAttentionBlock` (it also returns its MSA output, after proj and before the residual add,
    which a following skipped block reuses). One signature for every block keeps the loop over blocks free
    of type dispatch, which TorchScript and torch.fx need."""

    # the SkipAt block interface replaces Block's (x -> x) on purpose: a SkipAt model calls no block as timm's
    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        z_prev: Optional[torch.Tensor],
        grid_size: Tuple[int, int],
        attn_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        z = self.attn(self.norm1(x), attn_mask=attn_mask)
        x = x + self.drop_path1(self.ls1(z))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, z


def validate_skip_indices(skip_indices: Sequence[int], depth: int) -> Tuple[int, ...]:
    """Sorted unique skip indices; a clear error for any index that cannot be skipped."""
    indices = tuple(sorted(set(int(i) for i in skip_indices)))
    for i in indices:
        if i == 0:
            raise ValueError(
                'skip index 0 is invalid: block 0 has no previous attention output to reuse '
                '(skip indices are 0-based; the paper skips blocks 3-8 of 12)'
            )
        if not 0 < i < depth:
            raise ValueError(f'skip index {i} is out of range for a ViT of depth {depth} (valid: 1..{depth - 1})')
    return indices


class SkipAtVisionTransformer(VisionTransformer):
    """timm VisionTransformer whose blocks at ``skip_indices`` skip self-attention (SkipAt).

    Takes every argument of timm's ``VisionTransformer`` plus ``skip_indices`` (0-based block indices),
    ``phi_hidden_ratio`` and ``phi_kernel_size``.
    """

    def __init__(
        self,
        *args: Any,
        skip_indices: Sequence[int] = DEFAULT_SKIP_INDICES,
        phi_hidden_ratio: float = 2.0,
        phi_kernel_size: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._install_skips(skip_indices, phi_hidden_ratio, phi_kernel_size)

    # -- construction -------------------------------------------------------------------------------
    def _install_skips(self, skip_indices: Sequence[int], hidden_ratio: float, kernel_size: int) -> None:
        self.skip_indices = validate_skip_indices(skip_indices, len(self.blocks))
        # A ModuleList, not timm's Sequential: the blocks no longer chain one tensor to the next, and
        # TorchScript compiles the forward of every Sequential it holds.
        blocks = list(self.blocks)
        for i, block in enumerate(blocks):
            if type(block) is not Block:
                raise TypeError(f"block {i} is a {type(block).__name__}; SkipAt needs timm's standard Block")
            if i not in self.skip_indices:
                block.__class__ = AttentionBlock  # same module, same weights; the SkipAt block interface
                continue
            act_layer = type(cast(nn.Module, block.mlp.act)) if hasattr(block.mlp, 'act') else nn.GELU
            phi = SkipAttentionPhi(self.embed_dim, hidden_ratio, kernel_size, act_layer=act_layer)
            phi.apply(init_weights_vit_timm)  # timm's ViT init; the conv keeps PyTorch's fan-in default
            norm2_weight = cast(torch.Tensor, block.norm2.weight)
            phi.to(device=norm2_weight.device, dtype=norm2_weight.dtype)
            blocks[i] = SkipAttentionBlock(block, self.num_prefix_tokens, phi)
        # timm types its blocks a Sequential; every SkipAt method iterates or indexes them, as ModuleList allows
        self.blocks = nn.ModuleList(blocks)  # type: ignore[assignment]

    def fix_init_weight(self) -> None:
        with torch.no_grad():
            for layer_id, layer in enumerate(self.blocks):
                scale = (2.0 * (layer_id + 1)) ** 0.5
                if isinstance(layer, Block):
                    cast(nn.Linear, layer.attn.proj).weight.div_(scale)
                mlp = cast(nn.Module, layer.mlp)
                cast(nn.Linear, mlp.fc2).weight.div_(scale)

    # -- forward ------------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        if self.dynamic_img_size:
            grid_size = self.patch_embed.dynamic_feat_size((x.shape[-2], x.shape[-1]))
        else:
            grid_size = self.patch_embed.grid_size
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        if not isinstance(self.patch_drop, nn.Identity):
            raise NotImplementedError("patch dropout removes tokens from the grid that SkipAt's Phi convolves")
        x = self.norm_pre(x)
        return x, grid_size

    def _forward_blocks(
        self,
        x: torch.Tensor,
        grid_size: Tuple[int, int],
        attn_mask: Optional[torch.Tensor],
        take_indices: List[int],
        last: int,
        norm: bool,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Blocks 0..last-1; returns x and the outputs of the blocks in ``take_indices``.

        Every block takes and returns (x, z), so the loop needs no type dispatch: eager, TorchScript (which
        unrolls the loop over the ModuleList) and torch.fx (no Python control flow on traced values) alike.
        """
        intermediates: List[torch.Tensor] = []
        z: Optional[torch.Tensor] = None
        for i, blk in enumerate(self.blocks):
            if i < last:
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x, z = checkpoint(blk, x, z, grid_size, attn_mask)
                else:
                    x, z = blk(x, z, grid_size, attn_mask)
                if i in take_indices:
                    intermediates.append(self.norm(x) if norm else x)
        return x, intermediates

    def forward_features(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        # torch._assert on a comparison, not `if is_causal: raise`: torch.fx traces it
        torch._assert(is_causal == False, 'SkipAt ViT does not support causal attention')  # noqa: E712
        x, grid_size = self._embed(x)
        x, _ = self._forward_blocks(x, grid_size, attn_mask, [], len(self.blocks), False)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = 'NCHW',
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """Same contract as timm's ``VisionTransformer.forward_intermediates``."""
        assert output_fmt in ('NCHW', 'NLC'), 'Output format must be one of NCHW or NLC.'
        torch._assert(is_causal == False, 'SkipAt ViT does not support causal attention')  # noqa: E712
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x, grid_size = self._embed(x)
        last = max_index + 1 if stop_early else len(self.blocks)
        x, intermediates = self._forward_blocks(x, grid_size, attn_mask, take_indices, last, norm)

        p = self.num_prefix_tokens
        prefix_tokens = [y[:, :p] for y in intermediates] if p else None
        intermediates = [y[:, p:] for y in intermediates]
        if output_fmt == 'NCHW':
            H, W = grid_size
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]

        if output_dict:
            result: Dict[str, Any] = {'image_intermediates': intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result['image_intermediates_prefix'] = prefix_tokens
            if not intermediates_only:
                result['image_features'] = self.norm(x)
            return result
        out: List[Any] = intermediates
        if return_prefix_tokens and prefix_tokens is not None:
            out = list(zip(intermediates, prefix_tokens))  # (patch tokens, prefix tokens) per block, as timm's
        if intermediates_only:
            return out
        return self.norm(x), out

    # -- what DINO and the evaluators use -----------------------------------------------------------
    def last_cls_tokens(self, x: torch.Tensor, n: int = 4) -> torch.Tensor:
        """CLS tokens of the last ``n`` blocks after the final norm, concatenated: (B, n * embed_dim).

        DINO's linear-evaluation features (n=4 for ViT-S).
        """
        return last_cls_tokens(self, x, n)

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention probabilities of the last block, (B, heads, N, N), computed explicitly."""
        return get_last_selfattention(self, x)


def last_cls_tokens(model: VisionTransformer, x: torch.Tensor, n: int = 4) -> torch.Tensor:
    """CLS tokens of the last ``n`` blocks after the final norm, concatenated, for any timm ViT."""
    if not model.has_class_token:
        raise ValueError('last_cls_tokens needs a model with a class token')
    # intermediates_only with the prefix tokens: a list of (patch tokens, prefix tokens) per block
    outs = cast(
        List[Tuple[torch.Tensor, torch.Tensor]],
        model.forward_intermediates(
            x, indices=n, return_prefix_tokens=True, norm=True, output_fmt='NLC', intermediates_only=True
        ),
    )
    return torch.cat([prefix[:, 0] for _, prefix in outs], dim=-1)


def get_last_selfattention(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Last block's attention probabilities softmax(q k^T / sqrt(d)), for visualisation.

    Runs the model up to the last block with its usual (fused) path, then computes the last block's
    attention matrix explicitly; the fused kernels never materialise it.
    """
    last = model.blocks[-1]
    if not isinstance(last, Block):
        raise ValueError('the last block has no self-attention (it is skipped); attention maps need a computed block')
    depth = len(model.blocks)
    if depth > 1:
        # intermediates_only: a list, of (patch tokens, prefix tokens) pairs where the model has prefix tokens
        feats = cast(
            List[Any],
            model.forward_intermediates(
                x,
                indices=[depth - 2],
                norm=False,
                stop_early=True,
                output_fmt='NLC',
                return_prefix_tokens=True,
                intermediates_only=True,
            ),
        )
        patches, prefix = feats[0] if model.num_prefix_tokens else (feats[0], None)
        h = torch.cat([prefix, patches], dim=1) if prefix is not None else patches
    else:
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    return attention_probabilities(last.attn, last.norm1(h))


def attention_probabilities(attn: nn.Module, y: torch.Tensor, rows: Optional[int] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of a timm ``Attention`` for its (normed) input ``y`` (B, N, D), computed
    explicitly: (B, heads, N, N), or only the first ``rows`` query rows (B, heads, rows, N)."""
    B, N, _ = y.shape
    qkv = cast(nn.Linear, attn.qkv)(y).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    if rows is not None:
        q = q[:, :, :rows]
    q, k = cast(nn.Module, attn.q_norm)(q), cast(nn.Module, attn.k_norm)(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def convert_to_skipat(
    model: VisionTransformer,
    skip_indices: Sequence[int] = DEFAULT_SKIP_INDICES,
    *,
    phi_hidden_ratio: float = 2.0,
    phi_kernel_size: int = 5,
    dynamic_img_size: Optional[bool] = None,
    inplace: bool = False,
) -> SkipAtVisionTransformer:
    """Turn a timm VisionTransformer (ViT, DeiT, any depth) into its SkipAt version.

    Blocks that keep their attention keep all their weights; skipped blocks keep their MLP and norm2
    weights and get a freshly initialised Phi. ``dynamic_img_size=True`` lets the converted model take
    any input size (DINO's 224 and 96 px crops) by resampling its position embeddings.
    """
    if type(model) is not VisionTransformer and not isinstance(model, SkipAtVisionTransformer):
        raise TypeError(
            f'convert_to_skipat takes a timm VisionTransformer, got {type(model).__name__} '
            '(distilled or hybrid variants change the token layout)'
        )
    if isinstance(model, SkipAtVisionTransformer) and model.skip_indices:
        raise ValueError(f'model already skips blocks {model.skip_indices}')
    if not inplace:
        model = copy.deepcopy(model)
    if dynamic_img_size is not None and dynamic_img_size != model.dynamic_img_size:
        _set_dynamic_img_size(model, dynamic_img_size)
    # Swap the class rather than rebuild: timm does not keep every constructor argument around, and
    # the subclass only adds behaviour, no state beyond what _install_skips sets.
    model.__class__ = SkipAtVisionTransformer
    skipat = cast(SkipAtVisionTransformer, model)
    skipat._install_skips(skip_indices, phi_hidden_ratio, phi_kernel_size)
    return skipat


def _set_dynamic_img_size(model: VisionTransformer, enable: bool) -> None:
    pe = model.patch_embed
    model.dynamic_img_size = enable  # type: ignore[misc]  # Final for TorchScript; set before any scripting
    pe.strict_img_size = not enable
    pe.flatten = not enable
    pe.output_fmt = Format.NHWC if enable else Format.NCHW

"""Forward hooks that capture, per block of a timm ViT or a SkipAt ViT, the MSA output Z and the class token's
attention row, reduced at once to per-batch Gram matrices so that nothing of size (tokens x dim) outlives the
block that produced it.

- Z: the attention's output after its output projection, before the residual add (``block.attn``'s output; for
  a skipped SkipAt block, the second element ``z`` of its ``(x, z)`` output: Phi's stand-in for the MSA output).
- CLS attention: softmax(q k^T / sqrt(d)) row of the class token, per head, recomputed explicitly from the
  attention's input (the fused kernels never materialise it), as ``get_last_selfattention`` does. A skipped
  block has none.
The model code is untouched: hooks only.
"""

from typing import Dict, Iterable, List, cast

import torch
from torch import nn

from skipssl.models import SkipAttentionBlock, attention_probabilities

COMPUTED, SKIPPED = 'attention', 'skipped'


def block_kinds(model: nn.Module) -> List[str]:
    """'attention' or 'skipped' per block; ValueError for a block that is neither (hooks would miss it)."""
    kinds = []
    for i, block in enumerate(getattr(model, 'blocks', ())):
        if isinstance(block, SkipAttentionBlock):
            kinds.append(SKIPPED)
        elif isinstance(getattr(block, 'attn', None), nn.Module) and hasattr(block.attn, 'qkv'):
            kinds.append(COMPUTED)
        else:
            raise ValueError(f'block {i} ({type(block).__name__}) has neither a timm attention nor a SkipAt Phi')
    if not kinds:
        raise ValueError(f'{type(model).__name__} has no transformer blocks to analyse')
    return kinds


def cls_attention(attn: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """(B, heads, N) attention probabilities of the class token (row 0) given the attention's input ``y``."""
    return attention_probabilities(attn, y, rows=1)[:, :, 0]


def gram(x: torch.Tensor) -> torch.Tensor:
    """Linear-kernel Gram matrix (B, B) of the per-sample features flattened, in float32."""
    flat = x.reshape(x.shape[0], -1).float()
    return flat @ flat.T


class BlockCapture:
    """Context manager: while active, every forward pass of ``model`` fills ``z_grams`` (block -> (B, B)) and
    ``attn_grams`` (computed block -> (heads + 1, B, B): one Gram per head, then one of the head-averaged row).

    Grams rather than activations: the streamed CKA needs nothing else, and they are B x B whatever the width.
    """

    def __init__(self, model: nn.Module, with_attention: bool = True) -> None:
        self.model, self.with_attention = model, with_attention
        self.kinds = block_kinds(model)
        self.z_grams: Dict[int, torch.Tensor] = {}
        self.attn_grams: Dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> 'BlockCapture':
        blocks = cast(Iterable[nn.Module], self.model.blocks)  # block_kinds() checked them
        for i, (block, kind) in enumerate(zip(blocks, self.kinds)):
            if kind == SKIPPED:
                self._handles.append(block.register_forward_hook(self._skipped_hook(i)))
            else:
                attn = cast(nn.Module, block.attn)  # block_kinds() checked it is one
                self._handles.append(attn.register_forward_hook(self._attention_hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.z_grams.clear()
        self.attn_grams.clear()

    def _skipped_hook(self, i: int):
        def hook(module: nn.Module, args, output) -> None:
            self.z_grams[i] = gram(output[1])

        return hook

    def _attention_hook(self, i: int):
        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            self.z_grams[i] = gram(output)
            if self.with_attention:
                rows = cls_attention(module, args[0]).float()  # (B, heads, N)
                per_head = torch.stack([gram(rows[:, h]) for h in range(rows.shape[1])])
                self.attn_grams[i] = torch.cat([per_head, gram(rows.mean(1))[None]])

        return hook

    def stacked(self, grams: Dict[int, torch.Tensor], layers: List[int]) -> torch.Tensor:
        """Grams of ``layers`` in order as one tensor; RuntimeError when a hook did not fire (e.g. stop_early)."""
        missing = [i for i in layers if i not in grams]
        if missing:
            raise RuntimeError(f'blocks {missing} produced no output in the last forward pass')
        return torch.stack([grams[i] for i in layers])

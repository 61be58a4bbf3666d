"""Every aten op of a run, with its FLOPs and the bytes it reads and writes, recorded at the dispatcher.

Runs on fake tensors (``FakeTensorMode``): shapes, dtypes and strides propagate, no memory is allocated and
nothing is computed, so a batch of 1024 costs nothing. FLOPs come from torch's FLOP-counter registry plus the
project's formulas for the kernels it lacks (``skipssl.models.complexity.EXTRA_FLOP_FORMULAS``); bytes are the
sizes of the tensors an op reads and writes, with views (ops whose outputs alias an input) free.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, shape_wrapper

from skipssl.models.complexity import EXTRA_FLOP_FORMULAS

aten = torch.ops.aten

FLOP_FORMULAS = {
    **flop_registry,
    **{k: v if getattr(v, '_get_raw', False) else shape_wrapper(v) for k, v in EXTRA_FLOP_FORMULAS.items()},
}
# the fused attention kernels: on a GPU the op reads q, k, v (and out, logsumexp, grad in the backward) and
# writes out and logsumexp (dq, dk, dv): never the N x N matrix, which lives in on-chip memory
FUSED_ATTENTION_OPS = frozenset(
    op
    for name in (
        '_scaled_dot_product_flash_attention',
        '_scaled_dot_product_flash_attention_backward',
        '_scaled_dot_product_efficient_attention',
        '_scaled_dot_product_efficient_attention_backward',
        '_scaled_dot_product_cudnn_attention',
        '_scaled_dot_product_cudnn_attention_backward',
        '_scaled_dot_product_flash_attention_for_cpu',
        '_scaled_dot_product_flash_attention_for_cpu_backward',
    )
    if (op := getattr(aten, name, None)) is not None
)
# no kernel: allocation without initialisation, views the schema does not mark as such
_FREE = frozenset(
    getattr(aten, name)
    for name in (
        'empty',
        'empty_strided',
        'new_empty',
        'new_empty_strided',
        'empty_like',
        'detach',
        'alias',
        'lift_fresh',
        '_unsafe_view',
    )
)
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# arguments a schema marks as written that a kernel only reads here: fused Adam(W) unscales the gradients in
# place only when given an fp16 grad scaler
_READ_ONLY = {
    op: frozenset({'grads'})
    for name in ('_fused_adam_', '_fused_adamw_')
    if (op := getattr(aten, name, None)) is not None
}


@dataclass(frozen=True)
class OpCost:
    """One kernel: the aten op, its FLOPs (multiply-add = 2), the bytes it reads and writes, and the dtype it
    computes in (of its first floating-point input; picks the peak a roofline uses)."""

    op: str
    flops: int
    bytes_read: int
    bytes_written: int
    dtype: str

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of memory a kernel touches for ``t``: its elements, or less where strides repeat them (a broadcast
    bias, an expanded scalar is read once)."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return min(t.numel(), span) * t.element_size()


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _tensors(tree) -> List[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _unique(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def op_cost(func, args: Tuple, kwargs: Dict, out: Any) -> Optional[OpCost]:
    """The cost of one dispatched op, or None for an op that launches no kernel (views, allocations)."""
    if func.namespace != 'aten' or func._overloadpacket in _FREE or _is_view(func):
        return None
    read_only = _READ_ONLY.get(func._overloadpacket, frozenset())
    mutated = [
        args[i] if i < len(args) else kwargs.get(a.name)
        for i, a in enumerate(func._schema.arguments)
        if a.alias_info is not None and a.alias_info.is_write and a.name not in read_only
    ]
    inputs = _unique(_tensors((args, kwargs)))
    written = _unique(_tensors(out) + _tensors(mutated))
    # copy_ overwrites its destination without reading it
    read = [t for t in inputs if not (func._overloadpacket is aten.copy_ and t is args[0])]
    formula = FLOP_FORMULAS.get(func._overloadpacket)
    flops = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
    floats = [t.dtype for t in inputs + written if t.is_floating_point()]
    return OpCost(
        op=str(func.overloadpacket.__name__),
        flops=flops,
        bytes_read=sum(tensor_bytes(t) for t in read),
        bytes_written=sum(tensor_bytes(t) for t in written),
        dtype=str(floats[0]).replace('torch.', '') if floats else 'none',
    )


class OpRecorder(TorchDispatchMode):
    """Records an :class:`OpCost` for every kernel dispatched inside it (``ops``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[OpCost] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        cost = op_cost(func, args, kwargs, out)
        if cost is not None:
            self.ops.append(cost)
        return out


_SOFTMAXES = frozenset(
    {torch.softmax, torch.log_softmax, torch.Tensor.softmax, torch.Tensor.log_softmax, F.softmax, F.log_softmax}
)


class CudaAutocastSoftmax(TorchFunctionMode):
    """Under CPU autocast, runs softmax and log_softmax of fp16/bf16 inputs in fp32, as CUDA autocast does (its
    fp32 list has them; CPU autocast's does not). With this, CPU autocast gives the dtypes CUDA autocast gives
    to every op of the models here: matmuls, convolutions and attention in low precision, layer norms on the
    fp32 residual stream in fp32, softmax in fp32."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            func in _SOFTMAXES
            and torch.is_autocast_enabled('cpu')
            and kwargs.get('dtype') is None
            and len(args) <= 2  # no dtype given by position
            and isinstance(args[0], torch.Tensor)
            and args[0].dtype in _LOW_PRECISION
        ):
            kwargs = dict(kwargs, dtype=torch.float32)
        return func(*args, **kwargs)

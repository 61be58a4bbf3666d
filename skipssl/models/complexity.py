"""Parameter and multiply-accumulate counts, measured by running the model (not by formula)."""

from typing import Any, Callable, Dict, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _conv_backward_flop(
    grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed, *args, out_shape=None, **kwargs
) -> int:
    # each of the input and the weight gradient costs one forward; torch's own formula ignores groups for the
    # weight gradient, which overcounts a depth-wise convolution (Phi's) by its channel count
    output_mask = args[2]
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


# What torch's counter lacks or gets wrong, for FlopCounterMode(custom_mapping=EXTRA_FLOP_FORMULAS): it knows the
# CUDA attention kernels but not the CPU ones SDPA dispatches to here (counted as the CUDA ones are), and it
# overcounts the weight gradient of grouped convolutions.
EXTRA_FLOP_FORMULAS: Dict[Any, Callable[..., int]] = {}
if hasattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu'):
    EXTRA_FLOP_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop
if hasattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu_backward'):
    EXTRA_FLOP_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flop
EXTRA_FLOP_FORMULAS[torch.ops.aten.convolution_backward] = _conv_backward_flop


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Tuple[int, ...] = (1, 3, 224, 224)) -> int:
    """Multiply-accumulates of one forward pass per sample, from torch's FLOP counter (FLOPs / 2).

    The counter covers matmuls, convolutions and scaled-dot-product attention; element-wise work
    (norms, activations, softmax) is not counted, as in the usual GMAC tables.
    """
    device = next(model.parameters()).device
    x = torch.zeros(input_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2 // input_size[0]

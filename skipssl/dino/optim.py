"""Optimiser-side pieces of DINO that work with any engine: parameter groups, applying the schedules,
freezing the head's last layer, per-parameter gradient clipping."""

from typing import Dict, Iterable, List

import torch
from torch import nn


def param_groups(model: nn.Module) -> List[Dict]:
    """Groups for AdamW: biases and 1-D parameters (norms, layer scales) get no weight decay, as in DINO;
    the head's last layer gets groups of its own so it can be frozen by zeroing its learning rate.

    Each group carries ``apply_wd`` and ``last_layer`` flags that :func:`apply_schedules` reads.
    """
    groups: Dict[tuple, List[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        apply_wd = not (name.endswith('.bias') or p.ndim <= 1)
        last = 'last_layer' in name
        groups.setdefault((apply_wd, last), []).append(p)
    return [
        {
            'params': params,
            'weight_decay': 0.0,
            'apply_wd': wd,
            'last_layer': last,
            'name': f'{"decay" if wd else "no_decay"}{"_last_layer" if last else ""}',
        }
        for (wd, last), params in sorted(groups.items())
    ]


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, freeze_last_layer: bool) -> None:
    """Set this iteration's lr and weight decay on every group.

    The last layer is frozen by lr 0: with AdamW that leaves it exactly unchanged (decoupled weight decay
    is scaled by lr too), and unlike clearing ``.grad`` it also works where an engine (DeepSpeed ZeRO)
    keeps gradients in its own buffers. AdamW still moves the frozen groups' moments and step count, which
    DINO's freeze (gradients set to None, so AdamW skips them) does not: call :func:`reset_frozen_state`
    after every frozen step so that the first unfrozen update is a fresh AdamW update, as in DINO.
    """
    for g in optimizer.param_groups:
        g['lr'] = 0.0 if (freeze_last_layer and g.get('last_layer', False)) else lr
        g['weight_decay'] = weight_decay if g.get('apply_wd', True) else 0.0


@torch.no_grad()
def reset_state(optimizer: torch.optim.Optimizer, last_layer_only: bool = False) -> None:
    """Zero the optimizer state (moments, step count) of every group, or of the last-layer groups only.

    A zeroed AdamW state is exactly a fresh one (AdamW initialises step, exp_avg and exp_avg_sq to zeros).
    After a freeze that resets the last layer at every frozen step, its state is as if it had never had a
    gradient, as in DINO. ``optimizer`` is the torch optimizer itself, whose groups carry the ``last_layer``
    flag of :func:`param_groups` (an engine may have replaced each group's params by flat fp32 partitions;
    the flag stays with the group).
    """
    for group in optimizer.param_groups:
        if last_layer_only and not group.get('last_layer', False):
            continue
        for p in group['params']:
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value):
                    value.zero_()


def reset_frozen_state(optimizer: torch.optim.Optimizer) -> None:
    """:func:`reset_state` of the last-layer groups: call it after every frozen step."""
    reset_state(optimizer, last_layer_only=True)


@torch.no_grad()
def clip_gradients_per_param(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """DINO's clip_grad: rescale each parameter's gradient to norm <= ``max_norm`` separately.

    Vectorised with foreach kernels and no host sync; returns the per-parameter norms before clipping.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads, 2.0))
    coefs = (max_norm / (norms.float() + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(coefs.to(grads[0].dtype).unbind()))
    return norms

"""The EMA teacher: a frozen copy of the student, updated in place from the student's parameters."""

import copy
from typing import Iterable, List, TypeVar

import torch
from timm.layers import DropPath
from torch import nn

M = TypeVar('M', bound=nn.Module)


def make_teacher(student: M) -> M:
    """Deep copy of ``student`` without drop-path, in eval mode, with no parameter requiring grad."""
    teacher = copy.deepcopy(student)
    _remove_drop_path(teacher)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _remove_drop_path(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, DropPath):
            setattr(module, name, nn.Identity())
        else:
            _remove_drop_path(child)


@torch.no_grad()
def ema_update(teacher_params: List[torch.Tensor], student_params: Iterable[torch.Tensor], momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for lists of matching tensors.

    ``student_params`` may be of another dtype (the fp32 master copy of a bf16 engine): they are cast.
    """
    student = [s.detach().to(t.dtype) for t, s in zip(teacher_params, student_params, strict=True)]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student, alpha=1.0 - momentum)


def matching_parameters(teacher: nn.Module, student: nn.Module) -> tuple:
    """(teacher params, student params) in the same order, matched by name; a clear error on mismatch."""
    t = dict(teacher.named_parameters())
    s = dict(student.named_parameters())
    if t.keys() != s.keys():
        raise ValueError(f'teacher and student parameters differ: {sorted(t.keys() ^ s.keys())[:5]}')
    names = list(t)
    return [t[n] for n in names], [s[n] for n in names]

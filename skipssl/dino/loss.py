"""DINO's self-distillation loss with teacher centring, and the collapse monitors it gets for free."""

from typing import Dict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher and student distributions over crop pairs.

    ``forward(student_out, teacher_out, teacher_temp)``: ``student_out`` is (n_crops * B, K), crop-major
    (crop 0 of every image, then crop 1, ...); ``teacher_out`` is (n_teacher_crops * B, K), the global crops
    likewise. The loss averages -sum P_t log P_s over every (teacher crop i, student crop v) pair with
    v != i. The centre moves once per optimizer step, as in DINO, by ``update_center()``: from the teacher
    outputs of every ``forward`` since the last update (all micro-batches of a gradient-accumulation step),
    averaged over all ranks, so K micro-batches of B give the centre of one batch of K x B. ``forward(...,
    update_center=True)`` (the default) updates at once, for the usual one forward per step.

    After each call ``metrics`` holds detached tensors (no host sync): ``teacher_entropy`` (mean entropy of
    P_t; near ln K when collapsed to uniform, near 0 when collapsed to one prototype), ``teacher_marginal_entropy``
    (entropy of the batch-mean P_t: how many prototypes are used), ``kl`` (mean KL(P_t || P_s) over the pairs)
    and ``center_norm``.
    """

    # buffers (registered in __init__; torch's stubs type a registered buffer ``Tensor | Module``)
    center: torch.Tensor
    _pending_sum: torch.Tensor
    _pending_count: torch.Tensor

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, n_teacher_crops: int = 2
    ) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.n_teacher_crops = n_teacher_crops
        self.register_buffer('center', torch.zeros(1, out_dim))
        # teacher outputs since the last centre update; empty at every optimizer-step boundary, so checkpoints
        # (always written there) need not hold them
        self.register_buffer('_pending_sum', torch.zeros(1, out_dim), persistent=False)
        self.register_buffer('_pending_count', torch.zeros(1), persistent=False)
        self._pending_forwards = 0
        self.metrics: Dict[str, torch.Tensor] = {}

    def forward(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float, update_center: bool = True
    ) -> torch.Tensor:
        nt = self.n_teacher_crops
        if teacher_out.shape[0] % nt or student_out.shape[-1] != self.out_dim or teacher_out.shape[-1] != self.out_dim:
            raise ValueError(
                f'DINOLoss(out_dim={self.out_dim}, n_teacher_crops={nt}) got student {tuple(student_out.shape)}, '
                f'teacher {tuple(teacher_out.shape)}'
            )
        B = teacher_out.shape[0] // nt
        if student_out.shape[0] % B or student_out.shape[0] // B < nt:
            raise ValueError(f'student_out has {student_out.shape[0]} rows, not a multiple >= {nt} of batch {B}')
        n_crops = student_out.shape[0] // B
        # fp32 softmax: bf16/fp16 logits at temperature 0.04 overflow or lose all resolution.
        log_ps = F.log_softmax(student_out.float() / self.student_temp, dim=-1).view(n_crops, B, -1)
        teacher = teacher_out.detach().float()
        pt = F.softmax((teacher - self.center) / teacher_temp, dim=-1).view(nt, B, -1)

        # ce[i, v] = mean over the batch of -sum_k P_t[i] log P_s[v]; one matmul over (batch, prototypes).
        ce = -(pt.reshape(nt, -1) @ log_ps.reshape(n_crops, -1).T) / B
        diag = torch.diagonal(ce[:, :nt]).sum()
        n_pairs = nt * n_crops - nt
        loss = (ce.sum() - diag) / n_pairs

        with torch.no_grad():
            log_pt = torch.log(pt.clamp_min(1e-30))
            teacher_entropy = -(pt * log_pt).sum(-1).mean()
            marginal = pt.mean(dim=(0, 1))
            self.metrics = {
                'teacher_entropy': teacher_entropy,
                'teacher_marginal_entropy': -(marginal * marginal.clamp_min(1e-30).log()).sum(),
                # every teacher crop pairs with n_crops - 1 student crops, so the mean KL is CE - H(P_t)
                'kl': loss.detach() - teacher_entropy,
            }
            self._pending_sum.add_(teacher.sum(dim=0, keepdim=True))
            self._pending_count.add_(teacher.shape[0])
            self._pending_forwards += 1
        if update_center:
            self.update_center()
        return loss

    @torch.no_grad()
    def update_center(self) -> None:
        """c <- m c + (1 - m) * mean of the teacher outputs since the last update, over all ranks (one
        all-reduce of sums and counts, as DINO's one all-reduce of the global batch's sum)."""
        if not self._pending_forwards:
            raise RuntimeError('DINOLoss.update_center() without a forward since the last update')
        batch_center, count = self._pending_sum.clone(), self._pending_count.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            dist.all_reduce(count)
        batch_center = batch_center / count
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
        self._pending_sum.zero_()
        self._pending_count.zero_()
        self._pending_forwards = 0
        self.metrics['center_norm'] = self.center.norm()

"""The DINO training step on a DeepSpeed engine, without data loading: shared by the trainer and the
step benchmark."""

from typing import List, Optional

import torch

from ..config import Config
from ..dino import DINOLoss, apply_schedules, ema_update, matching_parameters, reset_frozen_state
from .engine import EngineView

DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}


class DINOStep:
    """DINO's ``train_one_epoch`` update, on any engine layout.

    ``micro(crops, it)`` runs one micro-batch (teacher on the 2 global crops, student on all, loss, backward;
    at the accumulation boundary: per-parameter clipping, this iteration's lr / weight decay / last-layer
    freeze, optimizer step). ``finish(it)``, once per optimizer step, then moves the DINO centre from the
    teacher outputs of all the step's micro-batches on all ranks and updates the teacher by EMA from the
    student's fp32 master weights. No host syncs.

    The freeze is DINO's: lr 0 keeps the last layer exactly still, and its optimizer state is zeroed after
    every frozen step, so the first unfrozen update is a fresh AdamW update, as when DINO drops the last
    layer's gradients and AdamW skips it (tests/test_dino_reference.py proves it at every layout).
    """

    def __init__(self, engine, teacher: torch.nn.Module, loss_fn: DINOLoss, cfg: Config, schedules) -> None:
        self.engine, self.teacher, self.loss_fn, self.cfg, self.sched = engine, teacher, loss_fn, cfg, schedules
        self.view = EngineView(engine)
        self.teacher_params, _ = matching_parameters(teacher, engine.module)
        self.dtype = DTYPES[cfg.engine.precision]
        self.device_type = next(teacher.parameters()).device.type
        self.grad_norms: Optional[torch.Tensor] = None  # per-parameter norms before the last clipping

    def micro(self, crops: List[torch.Tensor], it: int) -> torch.Tensor:
        e, s, o = self.engine, self.sched, self.cfg.optim
        with torch.no_grad(), torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            teacher_out = self.teacher(crops[:2])
        student_out = e([c.to(self.dtype) for c in crops])
        loss = self.loss_fn(student_out, teacher_out, float(s.teacher_temp[it]), update_center=False)
        e.backward(loss)
        boundary = e.is_gradient_accumulation_boundary()
        frozen = it < s.freeze_last_layer_iters
        if boundary:
            if o.clip_mode == 'per_param' and o.clip_grad > 0:
                self.grad_norms = self.view.clip_per_param(o.clip_grad)
            apply_schedules(e.optimizer, float(s.lr[it]), float(s.wd[it]), freeze_last_layer=frozen)
        e.step()
        if boundary and frozen:
            reset_frozen_state(self.view.base_optimizer)
        return loss.detach().float()

    def finish(self, it: int) -> None:
        # DINO moves the centre in the loss's forward, whether or not fp16's scaler then skips the step
        self.loss_fn.update_center()
        if self.engine.was_step_applied():  # an fp16 overflow skips the step, and so the EMA
            ema_update(self.teacher_params, self.view.master_params(), float(self.sched.momentum[it]))

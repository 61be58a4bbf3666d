"""What a run is made of, derived from its config and world size, without training anything: the plan (sizes
every schedule is indexed by), DINO's per-iteration schedules, the student network and its spec. The trainer,
the launcher's pre-submission checks and the benchmarks build from here; the global-batch formula lives here
only (``global_batch``)."""
from dataclasses import dataclass
from typing import Dict

import numpy as np

from .. import checkpoint as ckpt
from ..config import Config
from ..data.shards import count_samples
from ..dino import (DINOHead, MultiCropWrapper, cosine_schedule, epoch_warmup_schedule, linear_warmup_schedule,
                    scaled_lr)


def global_batch(micro_batch: int, accum: int, world_size: int) -> int:
    """Images per optimizer step: micro-batch per rank x accumulation steps x ranks."""
    return micro_batch * accum * world_size


@dataclass
class Plan:
    """Sizes derived from the config and the world: everything the schedules are indexed by."""
    world_size: int
    micro_batch: int
    accum: int
    iterations_per_epoch: int
    epochs: int

    @property
    def global_batch(self) -> int:
        return global_batch(self.micro_batch, self.accum, self.world_size)

    @property
    def total_iterations(self) -> int:
        return self.iterations_per_epoch * self.epochs


@dataclass
class Schedules:
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    freeze_last_layer_iters: int


def make_schedules(cfg: Config, plan: Plan) -> Schedules:
    ipe, total = plan.iterations_per_epoch, plan.total_iterations
    o, lo = cfg.optim, cfg.loss
    lr = cosine_schedule(scaled_lr(o.base_lr, plan.global_batch), o.min_lr, total,
                         warmup_iters=int(round(o.warmup_epochs * ipe)))
    wd = cosine_schedule(o.weight_decay, o.weight_decay_end, total)
    momentum = cosine_schedule(cfg.teacher.momentum, cfg.teacher.momentum_end, total)
    if lo.teacher_temp_schedule == 'per_epoch':
        temp = epoch_warmup_schedule(lo.warmup_teacher_temp, lo.teacher_temp, plan.epochs,
                                     int(lo.warmup_teacher_temp_epochs), ipe)
    else:
        temp = linear_warmup_schedule(lo.warmup_teacher_temp, lo.teacher_temp, total,
                                      int(round(lo.warmup_teacher_temp_epochs * ipe)))
    return Schedules(lr, wd, momentum, temp, int(round(o.freeze_last_layer_epochs * ipe)))


def samples_per_epoch(cfg: Config) -> int:
    if cfg.data.samples_per_epoch:
        return cfg.data.samples_per_epoch
    n = count_samples(cfg.data.train_shards)
    if not n:
        raise ValueError(f"data.samples_per_epoch is 0 and {cfg.data.train_shards!r} has no shard index to count "
                         "samples from: set data.samples_per_epoch")
    return n


def make_plan(cfg: Config, world_size: int) -> Plan:
    n = samples_per_epoch(cfg)
    per_iter = global_batch(cfg.data.batch_size_per_rank, cfg.train.grad_accum_steps, world_size)
    ipe = n // per_iter
    if ipe < 1:
        raise ValueError(f"an epoch of {n} samples is less than one global batch ({world_size} ranks x "
                         f"{cfg.data.batch_size_per_rank} x {cfg.train.grad_accum_steps} accumulation steps)")
    return Plan(world_size, cfg.data.batch_size_per_rank, cfg.train.grad_accum_steps, ipe, cfg.train.epochs)


def model_spec(cfg: Config) -> Dict:
    return {'name': cfg.model.name, 'kwargs': dict(cfg.model.kwargs)}


def build_student(cfg: Config) -> MultiCropWrapper:
    backbone = ckpt.build_backbone(cfg.model.name, dict(cfg.model.kwargs, drop_path_rate=cfg.model.drop_path_rate))
    if backbone.num_features <= 0:
        raise ValueError(f"model {cfg.model.name} has no feature dimension")
    if cfg.model.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    h = cfg.head
    head = DINOHead(backbone.num_features, h.out_dim, h.hidden_dim, h.bottleneck_dim, h.nlayers, h.norm_last_layer)
    return MultiCropWrapper(backbone, head)

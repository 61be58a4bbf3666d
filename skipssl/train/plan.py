"""What a run is made of, derived from its config and world size, without training anything: the plan (sizes
every schedule is indexed by), DINO's per-iteration schedules, the student network and its spec. The trainer,
the launcher's pre-submission checks and the benchmarks build from here; the global-batch formula lives here
only (``global_batch``)."""

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, cast

import numpy as np

from .. import checkpoint as ckpt
from ..config import Config
from ..data.shards import count_samples
from ..data.slots import check_slots, default_slots
from ..dino import DINOHead, MultiCropWrapper, cosine_schedule, epoch_warmup_schedule, linear_warmup_schedule, scaled_lr

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer


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
    slots: int = 0  # virtual slots of the data stream (skipssl.data.slots)

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
    lr = cosine_schedule(
        scaled_lr(o.base_lr, plan.global_batch), o.min_lr, total, warmup_iters=int(round(o.warmup_epochs * ipe))
    )
    wd = cosine_schedule(o.weight_decay, o.weight_decay_end, total)
    momentum = cosine_schedule(cfg.teacher.momentum, cfg.teacher.momentum_end, total)
    if lo.teacher_temp_schedule == 'per_epoch':
        temp = epoch_warmup_schedule(
            lo.warmup_teacher_temp, lo.teacher_temp, plan.epochs, int(lo.warmup_teacher_temp_epochs), ipe
        )
    else:
        temp = linear_warmup_schedule(
            lo.warmup_teacher_temp, lo.teacher_temp, total, int(round(lo.warmup_teacher_temp_epochs * ipe))
        )
    return Schedules(lr, wd, momentum, temp, int(round(o.freeze_last_layer_epochs * ipe)))


def samples_per_epoch(cfg: Config) -> int:
    if cfg.data.samples_per_epoch:
        return cfg.data.samples_per_epoch
    n = count_samples(cfg.data.train_shards)
    if not n:
        raise ValueError(
            f'data.samples_per_epoch is 0 and {cfg.data.train_shards!r} has no shard index to count '
            'samples from: set data.samples_per_epoch'
        )
    return n


def accumulation_for(kept_batch: int, micro_batch: int, world_size: int, slots: Optional[int] = None) -> int:
    """The accumulation steps that keep a run's global batch of ``kept_batch`` images with ``micro_batch`` images
    per rank on ``world_size`` ranks, whose data stream is cut into ``slots`` virtual slots; ValueError naming the
    world sizes and micro-batches that would work."""
    if slots is not None:
        check_slots(slots, kept_batch, world_size)
    per_rank, rest = divmod(kept_batch, world_size)
    if rest == 0 and per_rank % micro_batch == 0:
        return per_rank // micro_batch
    sizes = [
        w
        for w in range(1, kept_batch // micro_batch + 1)
        if kept_batch % (micro_batch * w) == 0 and (slots is None or slots % w == 0)
    ]
    micros = [b for b in range(per_rank, 0, -1) if per_rank % b == 0] if rest == 0 else []
    where = (
        f'on {world_size} ranks set data.batch_size_per_rank to one of {micros}'
        if micros
        else f'{world_size} ranks cannot share {kept_batch} images equally'
    )
    fits = f'with this micro-batch it resumes on {sizes} ranks' if sizes else 'no number of ranks fits this micro-batch'
    raise ValueError(
        f"the run's global batch of {kept_batch} images cannot be kept on {world_size} ranks with "
        f'data.batch_size_per_rank={micro_batch} ({kept_batch} is not a multiple of {micro_batch} x '
        f'{world_size}): {fits}; {where}'
    )


def make_plan(cfg: Config, world_size: int, saved: Optional[Dict] = None) -> Plan:
    """The plan of a new run (the config's accumulation steps and virtual slots), or, with ``saved`` (the layout
    a resumed run's checkpoint records), the accumulation steps that keep its global batch on ``world_size`` ranks
    and its slots, so every schedule and every global batch stay as they were."""
    n = samples_per_epoch(cfg)
    micro = cfg.data.batch_size_per_rank
    if saved is None:
        accum = cfg.train.grad_accum_steps
        batch = global_batch(micro, accum, world_size)
        slots = cfg.data.virtual_slots or default_slots(world_size, cfg.data.num_workers, batch)
        check_slots(slots, batch, world_size)
    else:
        batch, slots = saved['global_batch'], saved.get('slots') or world_size
        accum = accumulation_for(batch, micro, world_size, slots)
    ipe = n // batch
    if ipe < 1:
        raise ValueError(
            f'an epoch of {n} samples is less than one global batch ({world_size} ranks x '
            f'{micro} x {accum} accumulation steps)'
        )
    return Plan(world_size, micro, accum, ipe, cfg.train.epochs, slots)


def in_effect(cfg: Config, plan: Plan) -> Tuple[Config, List[str]]:
    """``cfg`` with the values ``plan`` keeps where they differ (a resumed run keeps its virtual slots and the
    global batch its accumulation steps give), and a note for each value of ``cfg`` that is not applied: what a
    run records as its config is what it runs with."""
    d, t = cfg.data, cfg.train
    notes = []
    if d.virtual_slots not in (0, plan.slots):
        notes.append(f'data.virtual_slots={d.virtual_slots} (the run keeps the {plan.slots} it started with)')
    if t.grad_accum_steps != plan.accum:
        notes.append(
            f'train.grad_accum_steps={t.grad_accum_steps} (the run keeps its global batch of {plan.global_batch} '
            f'images: {plan.accum} on {plan.world_size} rank(s) of {plan.micro_batch})'
        )
    kept = dataclasses.replace(
        cfg,
        data=dataclasses.replace(d, virtual_slots=plan.slots),
        train=dataclasses.replace(t, grad_accum_steps=plan.accum),
    )
    return kept, notes


def layout(cfg: Config, plan: Plan) -> Dict:
    """How a checkpoint's ranks were laid out, recorded with it: what a resume may change and must report."""
    return {
        'world_size': plan.world_size,
        'zero_stage': cfg.engine.zero_stage,
        'precision': cfg.engine.precision,
        'micro_batch': plan.micro_batch,
        'accum': plan.accum,
        'global_batch': plan.global_batch,
        'slots': plan.slots,
    }


def model_spec(cfg: Config) -> Dict:
    return {'name': cfg.model.name, 'kwargs': dict(cfg.model.kwargs)}


def build_student(cfg: Config) -> MultiCropWrapper:
    from ..models import set_attention

    # typed as timm's ViT for its backbone API (num_features, set_grad_checkpointing), which nn.Module lacks
    backbone = cast(
        'VisionTransformer',
        ckpt.build_backbone(cfg.model.name, dict(cfg.model.kwargs, drop_path_rate=cfg.model.drop_path_rate)),
    )
    if backbone.num_features <= 0:
        raise ValueError(f'model {cfg.model.name} has no feature dimension')
    set_attention(backbone, cfg.model.attention)  # the teacher, a copy of the student, inherits it
    if cfg.model.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    h = cfg.head
    head = DINOHead(backbone.num_features, h.out_dim, h.hidden_dim, h.bottleneck_dim, h.nlayers, h.norm_last_layer)
    return MultiCropWrapper(backbone, head)

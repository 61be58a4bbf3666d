"""DINO pretraining with a DeepSpeed student engine and an EMA teacher.

One iteration = one optimizer step over ``grad_accum_steps`` micro-batches per rank. Every schedule (lr,
weight decay, teacher momentum and temperature, last-layer freeze) is a per-iteration array indexed by the
global iteration, as in DINO's code. Host syncs happen only at log, checkpoint and epoch boundaries.
"""
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.utils.data import DataLoader

from skipssl_common.artefacts import ExportMeta, RunSummary

from .. import checkpoint as ckpt
from ..config import Config
from ..data import (BatchedMultiCrop, MultiCropTransform, PretrainShards, ReaderState,
                    canvas_resize, decode_sample, resolve_shards)
from ..data.reader import batch_seed, iter_raw_samples
from ..dino import DINOLoss, collapse_state, make_teacher
from . import state as train_state
from .distributed import DistInfo, all_reduce_cpu
from .engine import build_engine
from ..analysis.attention import cls_attention_maps, mass_masks, render
from .logger import DeviceClock, RunLogger, device_unit, devices_per_rank
from .plan import build_student, make_plan, make_schedules, model_spec
from .step import DINOStep

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


class StopRequest:
    """SIGTERM / SIGUSR1 (what SLURM sends before preemption or time-out), SIGUSR2 (submitit's choice for
    ``--signal``) and SIGINT set a flag; the loop checkpoints at the next iteration boundary and returns."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous = {}

    def install(self) -> 'StopRequest':
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


def _ignore_stop_signals(_worker_id: int) -> None:
    # SLURM signals every process of the step; loader workers must not die before the trainer checkpoints
    for s in StopRequest.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


@dataclass
class Position:
    epoch: int = 0
    iteration: int = 0                  # optimizer steps done
    images_seen: int = 0
    per_epoch: List[Dict] = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo, run_dir: Path) -> None:
        self.cfg, self.info, self.run_dir = cfg, info, run_dir
        self.device = info.device
        self.plan = make_plan(cfg, info.world_size)
        self.sched = make_schedules(cfg, self.plan)
        self.urls = resolve_shards(cfg.data.train_shards, allow_pipe=cfg.data.allow_pipe_shards)
        self.ckpt_root = run_dir / 'checkpoints'
        self.stop = StopRequest()

        torch.manual_seed(cfg.experiment.seed)  # same initial weights on every rank
        student = build_student(cfg)
        self.teacher = make_teacher(student).to(self.device)
        self.engine = build_engine(student, cfg, info.world_size, self.device.type)
        if cfg.model.compile:
            self.engine.module.backbone.compile()
            self.teacher.backbone.compile()
        self.loss_fn = DINOLoss(cfg.head.out_dim, cfg.loss.student_temp, cfg.loss.center_momentum).to(self.device)
        self.step = DINOStep(self.engine, self.teacher, self.loss_fn, cfg, self.sched)
        self.view = self.step.view
        self.mc = cfg.augment
        self.device_aug = BatchedMultiCrop(self.mc) if cfg.data.augment_on == 'device' else None
        self.aug_gen = torch.Generator(device=self.device) if self.device_aug else None

        torch.manual_seed(cfg.experiment.seed + 1 + info.rank)  # drop-path differs between ranks
        self.pos = Position()
        self.reader_state = ReaderState()
        self.clock = DeviceClock()
        self.logger = RunLogger(run_dir, info.is_main)
        self._first_nonfinite = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._loss_sum = torch.zeros((), device=self.device)
        self._epoch_loss_sum = torch.zeros((), device=self.device)

    # -- state --------------------------------------------------------------------------------------------
    def model_blob(self, student_state: Dict, device_hours: float) -> Dict:
        return {
            'student': student_state,
            'teacher': {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()},
            'loss_center': self.loss_fn.center.detach().cpu(),
            'model': model_spec(self.cfg),
            'position': {'epoch': self.pos.epoch, 'iteration': self.pos.iteration,
                         'images_seen': self.pos.images_seen, 'device_hours': device_hours,
                         'device_hours_unit': device_unit(self.device.type)},
            'per_epoch': json.dumps(self.pos.per_epoch),
            'data': self.data_meta(),
            'config': self.cfg.to_yaml(),
        }

    def rank_blob(self) -> Dict:
        e = self.engine
        return {
            'optimizer': e.optimizer.state_dict(),
            'engine': {'global_steps': e.global_steps, 'global_samples': e.global_samples,
                       'micro_steps': e.micro_steps, 'skipped_steps': e.skipped_steps},
            'rng': train_state.rng_state(self.device),
            'reader': self.reader_state.state_dict(),
            'device_seconds': self.clock.seconds,
        }

    def data_meta(self) -> Dict:
        d, a = self.cfg.data, self.cfg.augment
        return {'channels': d.channels, 'mean': list(a.mean), 'std': list(a.std), 'eval_resize': d.eval_resize,
                'eval_crop': d.eval_crop}

    def save(self) -> Path:
        self._check_finite()
        self.clock.lap()
        student_state = self.view.master_state_dict()  # collective when ZeRO partitions the master weights
        hours = self.device_hours()
        folder = train_state.save(self.ckpt_root, self.pos.iteration, self.info,
                                  self.model_blob(student_state, hours) if self.info.is_main else None,
                                  self.rank_blob(), self.cfg.train.keep_checkpoints)
        if self.info.is_main:
            log.info("checkpoint %s", folder)
        return folder

    def resume(self, folder: Optional[Path]) -> bool:
        """Load ``folder``, a checkpoint ``train_state.find_resumable`` accepted (None: a new run)."""
        if folder is None:
            return False
        model_blob, rank_blob = train_state.load(folder, self.info)
        e = self.engine
        e.module.load_state_dict(model_blob['student'])
        if self.view.partitioned:
            states = [None] * self.info.world_size
            states[self.info.rank] = rank_blob['optimizer']
            e.optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
        else:
            e.optimizer.load_state_dict(rank_blob['optimizer'])
        for k, v in rank_blob['engine'].items():
            setattr(e, k, v)
        self.teacher.load_state_dict(model_blob['teacher'])
        self.loss_fn.center.copy_(model_blob['loss_center'])
        p = model_blob['position']
        self.pos = Position(p['epoch'], p['iteration'], p['images_seen'], json.loads(model_blob['per_epoch']))
        self.reader_state = ReaderState.from_dict(rank_blob['reader'])
        self.clock = DeviceClock(rank_blob['device_seconds'])
        train_state.set_rng_state(rank_blob['rng'], self.device)
        if self.info.is_main:
            log.info("resumed from %s (epoch %d, iteration %d)", folder, self.pos.epoch, self.pos.iteration)
        return True

    # -- data -------------------------------------------------------------------------------------------
    def loader(self) -> DataLoader:
        c, d = self.cfg, self.cfg.data
        transform = canvas_resize(d.canvas_size) if self.device_aug else MultiCropTransform(self.mc)
        dataset = PretrainShards(
            self.urls, batch_size=d.batch_size_per_rank,
            samples_per_epoch=self.plan.iterations_per_epoch * self.plan.global_batch, transform=transform,
            rank=self.info.rank, world_size=self.info.world_size, num_workers=d.num_workers,
            seed=c.experiment.seed, shuffle_buffer=d.shuffle_buffer, channels=d.channels,
            max_skip_fraction=d.max_skip_fraction)
        try:
            dataset.set_state(self.reader_state)
        except ValueError as exn:  # a resume with other loader workers: the user's to fix, in one line
            raise ckpt.CheckpointError(f"cannot resume the data reader: {exn}") from exn
        gen = torch.Generator().manual_seed(batch_seed(c.experiment.seed, self.reader_state.epoch, self.info.rank, -1))
        return DataLoader(dataset, batch_size=None, num_workers=d.num_workers, pin_memory=self.device.type == 'cuda',
                          prefetch_factor=4 if d.num_workers else None, generator=gen,
                          worker_init_fn=_ignore_stop_signals if d.num_workers else None)

    def crops(self, batch: Dict, micro: int) -> List[torch.Tensor]:
        if self.device_aug is None:
            return [c.to(self.device, non_blocking=True) for c in batch['crops']]
        self.aug_gen.manual_seed(batch_seed(self.cfg.experiment.seed, self.pos.iteration, self.info.rank, micro))
        images = batch['images'].to(self.device, non_blocking=True)
        return self.device_aug(images, batch['sizes'].to(self.device, non_blocking=True), generator=self.aug_gen)

    # -- one iteration --------------------------------------------------------------------------------------
    def iteration(self, batches) -> float:
        it = self.pos.iteration
        data_wait = 0.0
        for micro in range(self.plan.accum):
            t0 = time.perf_counter()
            batch = next(batches)
            self.reader_state.update(batch)
            crops = self.crops(batch, micro)
            data_wait += time.perf_counter() - t0
            loss = self.step.micro(crops, it)
            self._loss_sum += loss
            self._epoch_loss_sum += loss
            self._first_nonfinite = torch.where((self._first_nonfinite < 0) & ~torch.isfinite(loss),
                                                torch.full_like(self._first_nonfinite, it), self._first_nonfinite)
        self.step.finish(it)
        self.pos.iteration += 1
        self.pos.images_seen += self.plan.global_batch
        return data_wait

    def _check_finite(self) -> None:
        bad = int(self._first_nonfinite.item())
        if bad >= 0:
            raise NonFiniteLoss(  # iterations counted from 1, as the console log does
                f"the DINO loss became non-finite at iteration {bad + 1} "
                f"(epoch {bad // self.plan.iterations_per_epoch}); "
                "stopping without saving this state (the newest checkpoint is intact). Try a lower lr, bf16 "
                "instead of fp16, or a smaller optim.clip_grad.")

    # -- logging ----------------------------------------------------------------------------------------------
    def device_hours(self) -> float:
        t = torch.tensor([self.clock.seconds * devices_per_rank(self.device.type)], dtype=torch.float64)
        return float(all_reduce_cpu(t, self.info)[0]) / 3600.0

    def log_scalars(self, n_iters: int, wall: float, data_wait: float) -> None:
        it = self.pos.iteration - 1
        self._check_finite()
        m = {k: float(v) for k, v in self.loss_fn.metrics.items()}
        loss = float(self._loss_sum) / max(n_iters * self.plan.accum, 1)
        self._loss_sum.zero_()
        values = {
            'train/loss': loss, 'train/lr': float(self.sched.lr[it]), 'train/weight_decay': float(self.sched.wd[it]),
            'train/teacher_momentum': float(self.sched.momentum[it]),
            'train/teacher_temp': float(self.sched.teacher_temp[it]),
            'collapse/teacher_entropy': m['teacher_entropy'], 'collapse/teacher_marginal_entropy':
                m['teacher_marginal_entropy'], 'collapse/kl': m['kl'], 'collapse/center_norm': m['center_norm'],
            'perf/images_per_s': n_iters * self.plan.global_batch / max(wall, 1e-9),
            'perf/step_time_s': wall / max(n_iters, 1), 'perf/data_wait_s': data_wait / max(n_iters, 1),
            'perf/compute_s': (wall - data_wait) / max(n_iters, 1),
            'data/skipped_samples': float(self.reader_state.total_skipped),
            f'cost/{device_unit(self.device.type).replace("-", "_")}': self.device_hours(),
        }
        # what the optimizer applied at the last step, group by group (the schedules above are what it should)
        for g in self.engine.optimizer.param_groups:
            values[f"optim/lr/{g['name']}"] = float(g['lr'])
            values[f"optim/weight_decay/{g['name']}"] = float(g['weight_decay'])
        if self.step.grad_norms is not None:
            values['optim/clipped_fraction'] = float((self.step.grad_norms > self.cfg.optim.clip_grad).float().mean())
        if self.device.type == 'cuda':
            values['perf/gpu_memory_gb'] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        self.logger.scalars(self.pos.iteration, values, epoch=self.pos.epoch)
        if self.info.is_main:
            log.info("it %d/%d epoch %d loss %.4f lr %.2e %.1f img/s (data wait %.0f%%)", self.pos.iteration,
                     self.plan.total_iterations, self.pos.epoch, loss, values['train/lr'],
                     values['perf/images_per_s'], 100 * data_wait / max(wall, 1e-9))
            state = collapse_state(m, self.cfg.head.out_dim)
            if state and self.pos.iteration >= self.cfg.train.collapse_warn_every:
                log.warning("iteration %d: the teacher looks collapsed (%s: entropy %.3f of ln K = %.3f, KL %.4f); "
                            "check teacher temperature, centre momentum and lr", self.pos.iteration, state,
                            m['teacher_entropy'], math.log(self.cfg.head.out_dim), m['kl'])

    def fixed_images(self) -> Optional[torch.Tensor]:
        """The first few images of the first shard, centre-cropped to the global crop size, normalised."""
        n = self.cfg.train.attention_images
        if n <= 0:
            return None
        from torchvision.transforms import v2
        size = self.mc.global_size
        tf = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True)])
        images = []
        for sample in iter_raw_samples(self.urls[:1], handler=lambda exn: True):
            try:
                images.append(tf(decode_sample(sample, self.cfg.data.channels)[0]))
            except ValueError:
                continue
            if len(images) == n:
                break
        return torch.stack(images) if images else None

    @torch.no_grad()
    def log_attention(self, images: Optional[torch.Tensor]) -> None:
        if images is None or not self.info.is_main:
            return
        backbone = self.teacher.backbone
        backbone = getattr(backbone, '_orig_mod', backbone)
        mean = images.new_tensor(self.mc.mean).view(1, -1, 1, 1)
        std = images.new_tensor(self.mc.std).view(1, -1, 1, 1)
        x = ((images - mean) / std).to(self.device)
        maps = cls_attention_maps(backbone, x).cpu()
        overlays, masked = render(images, maps, mass_masks(maps))
        # at the iteration they were computed at, like every scalar (the end of an epoch)
        self.logger.images('attention/images', images, self.pos.iteration)
        self.logger.images('attention/last_layer_cls', overlays, self.pos.iteration)
        self.logger.images('attention/last_layer_cls_mask60', masked, self.pos.iteration)

    # -- epochs -----------------------------------------------------------------------------------------------
    def end_epoch(self, epoch_start_wall: float, epoch_start_iter: int, images: Optional[torch.Tensor]) -> None:
        self._check_finite()
        self.clock.lap()
        hours = self.device_hours()
        n = self.pos.iteration - epoch_start_iter
        wall = time.perf_counter() - epoch_start_wall
        self.pos.per_epoch.append({
            'epoch': self.pos.epoch, 'iteration': self.pos.iteration, 'images_seen': self.pos.images_seen,
            'device_hours': hours, 'images_per_s': n * self.plan.global_batch / max(wall, 1e-9),
            'loss': float(self._epoch_loss_sum) / max(n * self.plan.accum, 1),
        })
        self._epoch_loss_sum.zero_()
        self.log_attention(images)
        self.pos.epoch += 1
        self.reader_state.next_epoch()
        if self.cfg.train.export_every_epoch or self.pos.epoch == self.plan.epochs:
            self.export(f'teacher-{self.pos.iteration:08d}.safetensors')

    def export(self, name: str) -> Optional[Path]:
        if not self.info.is_main:
            return None
        meta = ExportMeta(self.cfg.model.name, dict(self.cfg.model.kwargs), iteration=self.pos.iteration,
                          epoch=self.pos.epoch, images_seen=self.pos.images_seen,
                          device_hours=self.pos.per_epoch[-1]['device_hours'] if self.pos.per_epoch else 0.0,
                          device_hours_unit=device_unit(self.device.type), run_dir=str(self.run_dir),
                          data=self.data_meta())
        return ckpt.save_backbone(self.teacher.backbone, self.run_dir / 'export' / name, meta)

    def summary(self, finished: bool, stopped_by: Optional[str]) -> RunSummary:
        hours = self.device_hours()
        seconds = hours * 3600 / max(self.info.world_size * devices_per_rank(self.device.type), 1)
        return RunSummary(
            run_name=self.run_dir.name, model=model_spec(self.cfg),
            skipat=bool(getattr(self.teacher.backbone, 'skip_indices', ())),  # asked of the model, not its name
            config_name=self.cfg.experiment.name, epochs_planned=self.plan.epochs,
            epochs_done=self.pos.epoch, iterations=self.pos.iteration,
            iterations_planned=self.plan.total_iterations, global_batch=self.plan.global_batch,
            images_seen=self.pos.images_seen,
            images_per_s=self.pos.images_seen / seconds if seconds > 0 else None,
            device={'kind': self.device.type, 'world_size': self.info.world_size,
                    'name': torch.cuda.get_device_name(self.device) if self.device.type == 'cuda' else 'cpu',
                    'threads_per_rank': torch.get_num_threads()},
            device_hours=hours, device_hours_unit=device_unit(self.device.type),
            per_epoch=self.pos.per_epoch, finished=finished, stopped_by=stopped_by)

    def fit(self, resume_from: Optional[Path]) -> RunSummary:
        """Train from ``resume_from`` (``train_state.find_resumable``'s decision; None: from the start)."""
        c = self.cfg
        resumed = self.resume(resume_from)
        if self.info.is_main and not resumed:
            self.logger.text('config', '```\n' + c.to_yaml() + '\n```')
        images = self.fixed_images() if self.info.is_main else None
        stop_at = c.train.stop_after_iterations or self.plan.total_iterations
        stopped_by = None
        self.stop.install()
        try:
            while self.pos.epoch < self.plan.epochs and self.pos.iteration < stop_at and stopped_by is None:
                stopped_by = self.run_epoch(stop_at, images)
        finally:
            self.stop.uninstall()
        finished = self.pos.epoch >= self.plan.epochs
        if finished and self.info.is_main:
            self.export('teacher.safetensors')
        summary = self.summary(finished, stopped_by)
        if self.info.is_main:
            summary.write(self.run_dir)
        self.logger.close()
        return summary

    def run_epoch(self, stop_at: int, images) -> Optional[str]:
        c = self.cfg
        batches = iter(self.loader())
        epoch_start_iter, epoch_start_wall = self.pos.iteration, time.perf_counter()
        end_of_epoch = (self.pos.epoch + 1) * self.plan.iterations_per_epoch
        interval_start, interval_iters, interval_wait = time.perf_counter(), 0, 0.0
        self.clock.start()
        self.engine.train()
        while self.pos.iteration < min(end_of_epoch, stop_at):
            interval_wait += self.iteration(batches)
            interval_iters += 1
            if self.pos.iteration % c.train.log_every == 0:
                self.log_scalars(interval_iters, time.perf_counter() - interval_start, interval_wait)
                interval_start, interval_iters, interval_wait = time.perf_counter(), 0, 0.0
            flag = torch.tensor([self.stop.signum or 0], dtype=torch.int64)
            signum = int(all_reduce_cpu(flag, self.info, op=torch.distributed.ReduceOp.MAX)[0])
            if signum:
                if self.pos.iteration == end_of_epoch:
                    self.end_epoch(epoch_start_wall, epoch_start_iter, images)
                self.save()
                self.clock.stop()
                name = signal.Signals(signum).name
                if self.info.is_main:
                    log.warning("%s received: checkpoint written at iteration %d; run the same command to resume",
                                name, self.pos.iteration)
                return name
            if self.pos.iteration % c.train.checkpoint_every == 0 and self.pos.iteration != end_of_epoch:
                self.save()
        del batches
        if self.pos.iteration == end_of_epoch:
            self.end_epoch(epoch_start_wall, epoch_start_iter, images)
        self.save()
        self.clock.stop()
        self.logger.flush()
        return None

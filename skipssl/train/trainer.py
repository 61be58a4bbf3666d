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
from typing import Any, Dict, List, Optional

import torch
from torch.utils.data import DataLoader

from skipssl_common.artefacts import ExportMeta, RunSummary

from .. import checkpoint as ckpt
from ..analysis.attention import cls_attention_maps, mass_masks, render
from ..config import Config
from ..data import BatchedMultiCrop, MultiCropTransform, ReaderState, canvas_resize, decode_sample, resolve_shards
from ..data.integrity import data_identity
from ..data.reader import batch_seed, iter_raw_samples
from ..data.slots import SlotShards, iterations, join
from ..dino import DINOLoss, collapse_state, make_teacher
from . import state as train_state
from .distributed import DistInfo, StopVote, all_reduce_cpu
from .engine import build_engine
from .logger import DeviceClock, RunLogger, device_unit, devices_per_rank
from .plan import build_student, layout, make_plan, make_schedules, model_spec
from .step import DINOStep

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


class StopRequest:
    """SIGTERM / SIGUSR1 (what SLURM sends before preemption or time-out), SIGUSR2 (submitit's choice for
    ``--signal``) and SIGINT set a flag; the ranks agree on it (``StopVote``, one iteration later with several
    ranks), and the loop checkpoints at that iteration boundary and returns."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[signal.Signals, Any] = {}

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
    iteration: int = 0  # optimizer steps done
    images_seen: int = 0
    per_epoch: List[Dict] = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        cfg: Config,
        info: DistInfo,
        run_dir: Path,
        saved_layout: Optional[Dict] = None,
        restart_stream: bool = False,
    ) -> None:
        """``saved_layout``: that of the checkpoint the run will resume from (``train_state.saved_layout``), whose
        global batch the plan keeps; ``restart_stream``: the interrupted epoch's stream starts again on resume
        (``train_state.check_stream``: the data changed)."""
        self.cfg, self.info, self.run_dir = cfg, info, run_dir
        self.device = info.device
        self.saved_layout, self.restart_stream = saved_layout, restart_stream
        self.plan = make_plan(cfg, info.world_size, saved_layout)
        self.layout = layout(cfg, self.plan)
        self.sched = make_schedules(cfg, self.plan)
        self.urls = resolve_shards(cfg.data.train_shards, allow_pipe=cfg.data.allow_pipe_shards)
        self.stream = train_state.stream_record(
            cfg.experiment.seed, cfg.data.shuffle_buffer, self.plan.iterations_per_epoch, data_identity(self.urls)
        )
        self.ckpt_root = run_dir / 'checkpoints'
        self.stop = StopRequest()
        self.stop_vote = StopVote(info)

        torch.manual_seed(cfg.experiment.seed)  # same initial weights on every rank
        student = build_student(cfg)
        self.teacher = make_teacher(student).to(self.device)
        self.engine = build_engine(student, cfg, info.world_size, self.device.type, self.plan.accum)
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
    def model_blob(self, student_state: Dict, device_hours: float, reader_state: Dict) -> Dict:
        return {
            'student': student_state,
            'teacher': {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()},
            'loss_center': self.loss_fn.center.detach().cpu(),
            'model': model_spec(self.cfg),
            'position': {
                'epoch': self.pos.epoch,
                'iteration': self.pos.iteration,
                'images_seen': self.pos.images_seen,
                'device_hours': device_hours,
                'device_hours_unit': device_unit(self.device.type),
            },
            'per_epoch': json.dumps(self.pos.per_epoch),
            'engine': self.engine_counters(),
            'reader': reader_state,
            'data': self.data_meta(),
            'config': self.cfg.to_yaml(),
        }

    def engine_counters(self) -> Dict:
        e = self.engine
        return {
            'global_steps': e.global_steps,
            'global_samples': e.global_samples,
            'micro_steps': e.micro_steps,
            'skipped_steps': e.skipped_steps,
        }

    def optimizer_blob(self) -> Dict:
        """AdamW's state per parameter name and fp16's loss-scaler state: what another layout resumes from."""
        blob = self.view.full_optimizer_state()  # collective when ZeRO partitions the state
        scaler = getattr(self.engine.optimizer, 'loss_scaler', None)
        blob['loss_scaler'] = (
            {k: v for k, v in vars(scaler).items() if isinstance(v, (bool, int, float))} if scaler is not None else {}
        )
        return blob

    def rank_blob(self) -> Dict:
        e = self.engine
        return {
            'optimizer': e.optimizer.state_dict(),
            'engine': self.engine_counters(),
            'rng': train_state.rng_state(self.device),
            'device_seconds': self.clock.seconds,
        }

    def all_slots(self) -> ReaderState:
        """Every slot's position (each rank knows its own slots'): one small all-reduce."""
        st, n = self.reader_state, self.plan.slots
        t = torch.zeros(3, n, dtype=torch.int64)
        for row, values in enumerate((st.offsets, st.skipped, st.unreadable)):
            for slot in self.own_slots():
                t[row, slot] = values[slot] if slot < len(values) else 0
        t = all_reduce_cpu(t, self.info)
        return ReaderState(st.epoch, st.step, *(row.tolist() for row in t))

    def own_slots(self) -> range:
        per_rank = self.plan.slots // self.info.world_size
        return range(self.info.rank * per_rank, (self.info.rank + 1) * per_rank)

    def data_meta(self) -> Dict:
        d, a = self.cfg.data, self.cfg.augment
        return {
            'channels': d.channels,
            'mean': list(a.mean),
            'std': list(a.std),
            'eval_resize': d.eval_resize,
            'eval_crop': d.eval_crop,
        }

    def save(self) -> Path:
        self._check_finite()
        self.clock.lap()
        student_state = self.view.master_state_dict()  # collective when ZeRO partitions the master weights
        optimizer_blob = self.optimizer_blob()
        reader_state = self.all_slots().state_dict()
        hours = self.device_hours()
        folder = train_state.save(
            self.ckpt_root,
            self.pos.iteration,
            self.info,
            self.model_blob(student_state, hours, reader_state) if self.info.is_main else None,
            self.rank_blob(),
            self.cfg.train.keep_checkpoints,
            self.layout,
            optimizer_blob if self.info.is_main else None,
            self.stream,
        )
        if self.info.is_main:
            log.info('checkpoint %s', folder)
        return folder

    def resume(self, folder: Optional[Path]) -> bool:
        """Load ``folder``, a checkpoint ``train_state.find_resumable`` accepted (None: a new run). On the
        checkpoint's layout the ranks load their own partitions (bit-exact); on another (ranks, ZeRO stage,
        precision) every rank loads its share of the world-size-independent master weights and AdamW state."""
        if folder is None:
            return False
        changed = train_state.relayout(self.saved_layout, self.layout)
        same_world = 'world_size' not in changed
        same_partitioning = not any(k in changed for k in train_state.PARTITIONING)
        model_blob, rank_blob, optimizer_blob = train_state.load(folder, self.info, same_world, same_partitioning)
        e = self.engine
        e.module.load_state_dict(model_blob['student'])
        if not same_partitioning:
            assert optimizer_blob is not None  # load() reads it whenever the partitioning changed
            self.view.set_master_params([model_blob['student'][n] for n in self.view.names])
            self.view.set_full_optimizer_state(optimizer_blob)
            scaler = getattr(e.optimizer, 'loss_scaler', None)
            for k, v in optimizer_blob['loss_scaler'].items() if scaler is not None else ():
                setattr(scaler, k, v)
        elif self.view.partitioned:
            assert rank_blob is not None  # the same partitioning is the same world size, whose blobs load() reads
            states = [None] * self.info.world_size
            states[self.info.rank] = rank_blob['optimizer']
            e.optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
        else:
            assert rank_blob is not None
            e.optimizer.load_state_dict(rank_blob['optimizer'])
        for k, v in (rank_blob or model_blob)['engine'].items():
            setattr(e, k, v)
        e.micro_steps = e.global_steps * self.plan.accum  # the accumulation boundary, whatever it was
        self.teacher.load_state_dict(model_blob['teacher'])
        self.loss_fn.center.copy_(model_blob['loss_center'])
        p = model_blob['position']
        self.pos = Position(p['epoch'], p['iteration'], p['images_seen'], json.loads(model_blob['per_epoch']))
        if 'reader' in model_blob and not self.restart_stream:
            self.reader_state = ReaderState.from_dict(model_blob['reader'])
        else:
            if not self.restart_stream:
                log.warning(
                    "%s holds no slot positions (written before virtual slots): the interrupted epoch's stream "
                    'starts again',
                    folder,
                )
            self.reader_state = ReaderState(epoch=p['epoch'], step=p['iteration'] % self.plan.iterations_per_epoch)
        if rank_blob is not None:
            self.clock = DeviceClock(rank_blob['device_seconds'])
            train_state.set_rng_state(rank_blob['rng'], self.device)
        else:  # the ranks' clocks summed into rank 0's, so the run's device-hours carry on
            seconds = p['device_hours'] * 3600 / devices_per_rank(self.device.type)
            self.clock = DeviceClock(seconds if self.info.is_main else 0.0)
            # new ranks, new drop-path streams, which must not repeat those of iteration 0
            torch.manual_seed(batch_seed(self.cfg.experiment.seed, self.pos.iteration, self.info.rank, -2))
        if self.info.is_main:
            log.info('resumed from %s (epoch %d, iteration %d)', folder, self.pos.epoch, self.pos.iteration)
            if changed:
                log.warning(
                    'resumed on another layout: %s; global batch %d kept%s',
                    ', '.join(f'{k} {a} -> {b}' for k, (a, b) in changed.items()),
                    self.plan.global_batch,
                    ''
                    if same_partitioning
                    else f' (optimizer state loaded from the world-size-independent {train_state.OPTIMIZER_FILE})',
                )
        return True

    # -- data -------------------------------------------------------------------------------------------
    def dataset(self) -> SlotShards:
        c, d = self.cfg, self.cfg.data
        transform = canvas_resize(d.canvas_size) if self.device_aug else MultiCropTransform(self.mc)
        dataset = SlotShards(
            self.urls,
            global_batch=self.plan.global_batch,
            n_slots=self.plan.slots,
            iterations_per_epoch=self.plan.iterations_per_epoch,
            transform=transform,
            rank=self.info.rank,
            world_size=self.info.world_size,
            num_workers=d.num_workers,
            seed=c.experiment.seed,
            shuffle_buffer=d.shuffle_buffer,
            channels=d.channels,
            max_skip_fraction=d.max_skip_fraction,
            max_pixels=d.max_image_pixels,
        )
        try:
            dataset.set_state(self.reader_state)
        except ValueError as exn:
            raise ckpt.CheckpointError(f'cannot resume the data reader: {exn}') from exn
        return dataset

    def loader(self, dataset: SlotShards) -> DataLoader:
        c, d = self.cfg, self.cfg.data
        gen = torch.Generator().manual_seed(batch_seed(c.experiment.seed, self.reader_state.epoch, self.info.rank, -1))
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=d.num_workers,
            pin_memory=self.device.type == 'cuda',
            prefetch_factor=4 if d.num_workers else None,
            generator=gen,
            worker_init_fn=_ignore_stop_signals if d.num_workers else None,
        )

    def crops(self, pieces: List[Dict], micro: int) -> List[torch.Tensor]:
        batch = join(pieces, self.device)
        if self.device_aug is None:
            return batch['crops']
        assert self.aug_gen is not None  # made with device_aug
        self.aug_gen.manual_seed(batch_seed(self.cfg.experiment.seed, self.pos.iteration, self.info.rank, micro))
        return self.device_aug(batch['images'], batch['sizes'], generator=self.aug_gen)

    # -- one iteration --------------------------------------------------------------------------------------
    def iteration(self, batches) -> float:
        it = self.pos.iteration
        data_wait = 0.0
        t0 = time.perf_counter()
        share = next(batches)  # this rank's share of the global batch, slot by slot
        for chunk in share['chunks']:
            self.reader_state.record(chunk['slot'], chunk)
        data_wait += time.perf_counter() - t0
        for micro, pieces in enumerate(share['micro']):
            t0 = time.perf_counter()
            crops = self.crops(pieces, micro)
            data_wait += time.perf_counter() - t0
            loss = self.step.micro(crops, it)
            self._loss_sum += loss
            self._epoch_loss_sum += loss
            self._first_nonfinite = torch.where(
                (self._first_nonfinite < 0) & ~torch.isfinite(loss),
                torch.full_like(self._first_nonfinite, it),
                self._first_nonfinite,
            )
        self.step.finish(it)
        self.pos.iteration += 1
        self.pos.images_seen += self.plan.global_batch
        return data_wait

    def _check_finite(self) -> None:
        bad = int(self._first_nonfinite.item())
        if bad >= 0:
            raise NonFiniteLoss(  # iterations counted from 1, as the console log does
                f'the DINO loss became non-finite at iteration {bad + 1} '
                f'(epoch {bad // self.plan.iterations_per_epoch}); '
                'stopping without saving this state (the newest checkpoint is intact). Try a lower lr, bf16 '
                'instead of fp16, or a smaller optim.clip_grad.'
            )

    # -- logging ----------------------------------------------------------------------------------------------
    def device_hours(self) -> float:
        t = torch.tensor([self.clock.seconds * devices_per_rank(self.device.type)], dtype=torch.float64)
        return float(all_reduce_cpu(t, self.info)[0]) / 3600.0

    def mean_loss(self, total: torch.Tensor, n_iters: int) -> float:
        """The loss over the global batches of ``n_iters`` iterations (all ranks' micro-batches: the same whatever
        the number of ranks); resets ``total``."""
        t = all_reduce_cpu(torch.tensor([float(total)], dtype=torch.float64), self.info)
        total.zero_()
        return float(t[0]) / max(n_iters * self.plan.accum * self.info.world_size, 1)

    def log_scalars(self, n_iters: int, wall: float, data_wait: float) -> None:
        it = self.pos.iteration - 1
        self._check_finite()
        m = {k: float(v) for k, v in self.loss_fn.metrics.items()}
        loss = self.mean_loss(self._loss_sum, n_iters)
        values = {
            'train/loss': loss,
            'train/lr': float(self.sched.lr[it]),
            'train/weight_decay': float(self.sched.wd[it]),
            'train/teacher_momentum': float(self.sched.momentum[it]),
            'train/teacher_temp': float(self.sched.teacher_temp[it]),
            'collapse/teacher_entropy': m['teacher_entropy'],
            'collapse/teacher_marginal_entropy': m['teacher_marginal_entropy'],
            'collapse/kl': m['kl'],
            'collapse/center_norm': m['center_norm'],
            'perf/images_per_s': n_iters * self.plan.global_batch / max(wall, 1e-9),
            'perf/step_time_s': wall / max(n_iters, 1),
            'perf/data_wait_s': data_wait / max(n_iters, 1),
            'perf/compute_s': (wall - data_wait) / max(n_iters, 1),
            'data/skipped_samples': float(self.all_slots().total_skipped),
            f'cost/{device_unit(self.device.type).replace("-", "_")}': self.device_hours(),
        }
        # what the optimizer applied at the last step, group by group (the schedules above are what it should)
        for g in self.engine.optimizer.param_groups:
            values[f'optim/lr/{g["name"]}'] = float(g['lr'])
            values[f'optim/weight_decay/{g["name"]}'] = float(g['weight_decay'])
        if self.step.grad_norms is not None:
            values['optim/clipped_fraction'] = float((self.step.grad_norms > self.cfg.optim.clip_grad).float().mean())
        if self.device.type == 'cuda':
            values['perf/gpu_memory_gb'] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.logger.scalars(self.pos.iteration, values, epoch=self.pos.epoch)
        if self.info.is_main:
            log.info(
                'it %d/%d epoch %d loss %.4f lr %.2e %.1f img/s (data wait %.0f%%)',
                self.pos.iteration,
                self.plan.total_iterations,
                self.pos.epoch,
                loss,
                values['train/lr'],
                values['perf/images_per_s'],
                100 * data_wait / max(wall, 1e-9),
            )
            state = collapse_state(m, self.cfg.head.out_dim)
            if state and self.pos.iteration >= self.cfg.train.collapse_warn_every:
                log.warning(
                    'iteration %d: the teacher looks collapsed (%s: entropy %.3f of ln K = %.3f, KL %.4f); '
                    'check teacher temperature, centre momentum and lr',
                    self.pos.iteration,
                    state,
                    m['teacher_entropy'],
                    math.log(self.cfg.head.out_dim),
                    m['kl'],
                )

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
                images.append(tf(decode_sample(sample, self.cfg.data.channels, self.cfg.data.max_image_pixels)[0]))
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
        self.pos.per_epoch.append(
            {
                'epoch': self.pos.epoch,
                'iteration': self.pos.iteration,
                'images_seen': self.pos.images_seen,
                'device_hours': hours,
                'images_per_s': n * self.plan.global_batch / max(wall, 1e-9),
                'loss': self.mean_loss(self._epoch_loss_sum, n),
            }
        )
        self.log_attention(images)
        self.pos.epoch += 1
        self.reader_state.next_epoch()
        if self.cfg.train.export_every_epoch or self.pos.epoch == self.plan.epochs:
            self.export(f'teacher-{self.pos.iteration:08d}.safetensors')

    def export(self, name: str) -> Optional[Path]:
        if not self.info.is_main:
            return None
        meta = ExportMeta(
            self.cfg.model.name,
            dict(self.cfg.model.kwargs),
            iteration=self.pos.iteration,
            epoch=self.pos.epoch,
            images_seen=self.pos.images_seen,
            device_hours=self.pos.per_epoch[-1]['device_hours'] if self.pos.per_epoch else 0.0,
            device_hours_unit=device_unit(self.device.type),
            run_dir=str(self.run_dir),
            data=self.data_meta(),
            attention=self.cfg.model.attention,
        )
        return ckpt.save_backbone(self.teacher.backbone, self.run_dir / 'export' / name, meta)

    def summary(self, finished: bool, stopped_by: Optional[str]) -> RunSummary:
        hours = self.device_hours()
        seconds = hours * 3600 / max(self.info.world_size * devices_per_rank(self.device.type), 1)
        return RunSummary(
            run_name=self.run_dir.name,
            model=model_spec(self.cfg),
            skipat=bool(getattr(self.teacher.backbone, 'skip_indices', ())),  # asked of the model, not its name
            config_name=self.cfg.experiment.name,
            epochs_planned=self.plan.epochs,
            epochs_done=self.pos.epoch,
            iterations=self.pos.iteration,
            iterations_planned=self.plan.total_iterations,
            global_batch=self.plan.global_batch,
            images_seen=self.pos.images_seen,
            images_per_s=self.pos.images_seen / seconds if seconds > 0 else None,
            device={
                'kind': self.device.type,
                'world_size': self.info.world_size,
                'name': torch.cuda.get_device_name(self.device) if self.device.type == 'cuda' else 'cpu',
                'threads_per_rank': torch.get_num_threads(),
            },
            device_hours=hours,
            device_hours_unit=device_unit(self.device.type),
            per_epoch=self.pos.per_epoch,
            finished=finished,
            stopped_by=stopped_by,
            data_fingerprint=self.stream['data']['fingerprint'],
        )

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
        dataset = self.dataset()
        batches = iterations(iter(self.loader(dataset)), dataset, self.plan.accum)
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
            signum = self.stop_vote(self.stop.signum or 0)  # no blocking collective: see StopVote
            if signum:
                if self.pos.iteration == end_of_epoch:
                    self.end_epoch(epoch_start_wall, epoch_start_iter, images)
                self.save()
                self.clock.stop()
                return self._stopped(signum)
            if self.pos.iteration % c.train.checkpoint_every == 0 and self.pos.iteration != end_of_epoch:
                self.save()
        del batches
        signum = self.stop_vote.settle()  # a signal of the last iteration: this boundary's checkpoint serves it
        if self.pos.iteration == end_of_epoch:
            self.end_epoch(epoch_start_wall, epoch_start_iter, images)
        self.save()
        self.clock.stop()
        self.logger.flush()
        return self._stopped(signum) if signum else None

    def _stopped(self, signum: int) -> str:
        name = signal.Signals(signum).name
        if self.info.is_main:
            log.warning(
                '%s received: checkpoint written at iteration %d; run the same command to resume',
                name,
                self.pos.iteration,
            )
        return name

"""``pretrain(cfg)``: check everything cheap, start the process group, train; and the command line."""

import argparse
import difflib
import logging
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import yaml

from skipssl_common.artefacts import RunSummary

from ..config import Config, ConfigError, load_config, short
from ..failure import FailureWatch, first_line
from ..runlock import RunLock

log = logging.getLogger('skipssl')


def preflight(cfg: Config) -> str:
    """Checks that need files or devices but no training: device and precision, shards, epoch size for the
    launcher's world size, model, output folder. Returns the device kind. Raises ConfigError naming the key."""
    from skipssl_common.distributed import world_size_from_env

    from ..checkpoint import CheckpointError, build_backbone, check_model_kwargs
    from ..data import first_readable_sample, resolve_shards
    from .distributed import resolve_device
    from .engine import precision_unsupported
    from .plan import make_plan
    from .state import newest_layout

    try:
        device = resolve_device(cfg.engine.device)
    except RuntimeError as exn:
        raise ConfigError(f'engine.device: {exn}') from exn
    unsupported = precision_unsupported(cfg.engine.precision)
    if unsupported:
        usable = [p for p in ('bf16', 'fp16', 'fp32') if p != cfg.engine.precision and precision_unsupported(p) is None]
        raise ConfigError(f'engine.precision: {unsupported}; use {" or ".join(usable)}')
    if not cfg.data.train_shards:
        raise ConfigError('data.train_shards: not set (a shard folder, index json, .txt list or brace pattern)')
    try:
        urls = resolve_shards(cfg.data.train_shards, allow_pipe=cfg.data.allow_pipe_shards)
        first_readable_sample(urls)
    except (FileNotFoundError, ValueError) as exn:
        raise ConfigError(f'data.train_shards: {exn}') from exn
    try:  # a resume keeps its checkpoint's layout, which rank 0 checks for all ranks (state.find_resumable)
        if newest_layout(Path(cfg.experiment.output_dir) / 'checkpoints') is None:
            make_plan(cfg, world_size_from_env())
    except ValueError as exn:
        raise ConfigError(f'data.samples_per_epoch: {exn}') from exn
    try:  # the evaluators rebuild an export from these kwargs only: a run they could not evaluate never starts
        check_model_kwargs(cfg.model.kwargs, 'model.kwargs')
    except CheckpointError as exn:
        raise ConfigError(str(exn)) from exn
    kwargs = dict(cfg.model.kwargs, drop_path_rate=cfg.model.drop_path_rate)
    try:
        build_backbone(cfg.model.name, kwargs)
    except (ValueError, TypeError, AssertionError, RuntimeError) as exn:  # timm checks kwargs with asserts
        raise ConfigError(
            f'model: {cfg.model.name} cannot be built with {short(cfg.model.kwargs)}: {str(exn) or type(exn).__name__}'
        ) from exn
    check_output_dir(Path(cfg.experiment.output_dir))
    return device


# what a run (or skipssl_launch, before it) writes into its folder: one of them marks a folder as a run's
RUN_ENTRIES = ('config.yaml', 'checkpoints', '.writer.lock', 'log.jsonl', 'tb', 'export', 'summary.json', 'submitit')


def check_output_dir(run_dir: Path) -> None:
    """The run folder, or the nearest folder above it that exists, must be writable; an existing folder must be
    empty or a run's: a run writes, and may later prune, files in it."""
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f'experiment.output_dir: cannot write to {existing}'
            + ('' if existing == run_dir else f' (to create {run_dir})')
        )
    if existing == run_dir:
        entries = {p.name for p in run_dir.iterdir()}
        if entries and not entries & set(RUN_ENTRIES):
            raise ConfigError(
                f'experiment.output_dir: {run_dir} holds {len(entries)} file(s) or folder(s) and is not a run '
                f'folder (none of {", ".join(RUN_ENTRIES)}): name a new or empty folder, or a run folder to resume'
            )


def _save_config(cfg: Config, run_dir: Path) -> None:
    from skipssl_common.io import atomic_write_text

    path = run_dir / 'config.yaml'
    text = cfg.to_yaml()
    if path.is_file() and path.read_text() != text:
        old = path.read_text().splitlines()
        diff = [
            ln
            for ln in difflib.unified_diff(old, text.splitlines(), lineterm='', n=0)
            if ln[:1] in '+-' and not ln.startswith(('+++', '---'))
        ]
        kept = run_dir / f'config-{time.strftime("%Y%m%d-%H%M%S")}.yaml'
        path.rename(kept)
        log.warning(
            'the config differs from the one this run folder was started with (kept as %s): %s',
            kept.name,
            '; '.join(diff),
        )
    atomic_write_text(text, path)


def describe_failure(exn: BaseException) -> Tuple[int, Optional[str]]:
    """(exit status, one-line message) of an error that stops a run; a None message for an internal error,
    which keeps its traceback."""
    from ..checkpoint import CheckpointError
    from ..data import TooManyBadSamples
    from ..runlock import RunFolderError
    from .trainer import NonFiniteLoss

    if isinstance(exn, ConfigError):
        return 2, f'config error: {exn}'
    if isinstance(exn, NonFiniteLoss):
        return 3, str(exn)
    if isinstance(exn, (CheckpointError, TooManyBadSamples, RunFolderError)):
        return 2, first_line(exn)
    if isinstance(exn, KeyboardInterrupt):
        return 130, 'interrupted'
    return 1, None


def _start_run(cfg: Config, info, run_dir: Path) -> Tuple[Optional[RunLock], Optional[Path], bool]:
    """Rank 0 takes the run folder's lock (None elsewhere) and decides where to resume and whether the
    interrupted epoch's stream starts again (``state.check_stream``); every rank gets the answer or stops.
    Nothing of an existing run changes before its resume is accepted."""
    from ..data import resolve_shards
    from ..data.integrity import data_identity
    from .distributed import rank0_decides
    from .plan import make_plan, model_spec
    from .state import check_stream, find_resumable, saved_layout, stream_record

    held: List[RunLock] = []
    rank0_decides(lambda: held.append(RunLock(run_dir).acquire()), info)
    folder = find_resumable(
        run_dir / 'checkpoints',
        info,
        model_spec(cfg),
        cfg.train.restart_if_no_valid_checkpoint,
        cfg.data.batch_size_per_rank,
    )

    def restart_stream() -> bool:
        if folder is None:
            return False
        plan = make_plan(cfg, info.world_size, saved_layout(folder))
        urls = resolve_shards(cfg.data.train_shards, allow_pipe=cfg.data.allow_pipe_shards)
        current = stream_record(
            cfg.experiment.seed, cfg.data.shuffle_buffer, plan.iterations_per_epoch, data_identity(urls)
        )
        return check_stream(folder, current, cfg.train.resume_with_changed_data)

    return (held[0] if held else None), folder, rank0_decides(restart_stream, info)


def pretrain(cfg: Config) -> RunSummary:
    """Train (or resume) the run in ``cfg.experiment.output_dir``; returns its summary. Collective: every
    rank calls it. With several ranks, a failure on any of them ends this process (``skipssl.failure``)."""
    from .distributed import init_distributed, shutdown
    from .plan import in_effect, make_plan
    from .state import saved_layout
    from .trainer import Trainer

    device = preflight(cfg)
    info = init_distributed(device)
    watch = FailureWatch(info.rank, info.world_size, 'pretrain.py').start()
    lock = None
    try:
        logging.basicConfig(
            level=logging.INFO if info.is_main else logging.WARNING,
            format=f'%(asctime)s [rank {info.rank}] %(levelname)s %(name)s: %(message)s',
        )
        run_dir = Path(cfg.experiment.output_dir)
        lock, resume_from, restart_stream = _start_run(cfg, info, run_dir)
        layout = saved_layout(resume_from)
        cfg, not_applied = in_effect(cfg, make_plan(cfg, info.world_size, layout))
        if info.is_main:
            if not_applied:
                log.warning('not applied on resume, kept as the run started: %s', '; '.join(not_applied))
            _save_config(cfg, run_dir)
            log.info('run %s on %d %s rank(s) (launcher: %s)', run_dir, info.world_size, device, info.launcher)
        summary = Trainer(cfg, info, run_dir, layout, restart_stream).fit(resume_from)
    except BaseException as exn:
        if watch.active:
            watch.fail(exn, describe_failure)  # ends this process: no tear-down that could wait for a peer
        shutdown(barrier=False)
        raise
    finally:
        if lock is not None:
            lock.release()
    watch.stop()
    shutdown()
    return summary


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog='pretrain.py',
        description='DINO pretraining of (SkipAt-)ViTs with DeepSpeed. Launch with torchrun, '
        'srun, or as one process; resumes from the newest checkpoint in experiment.output_dir.',
    )
    p.add_argument('--config', help='experiment YAML (configs/*.yaml)')
    p.add_argument('--print-config', action='store_true', help='print the resolved config and exit')
    p.add_argument('overrides', nargs='*', help='dotted overrides, e.g. train.epochs=10 data.num_workers=4')
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(cfg.to_yaml(), end='')
            return 0
        summary = pretrain(cfg)
    except Exception as exn:
        status, line = describe_failure(exn)
        if line is None:
            raise
        print(f'pretrain.py: {line}', file=sys.stderr)
        return status
    if int(os.environ.get('RANK', '0')) == 0:
        state = 'finished' if summary.finished else f'stopped ({summary.stopped_by or "iteration limit"})'
        print(
            yaml.safe_dump(
                {
                    'run': cfg.experiment.output_dir,
                    'state': state,
                    'iterations': summary.iterations,
                    'device_hours': None if summary.device_hours is None else round(summary.device_hours, 4),
                    'unit': summary.device_hours_unit,
                },
                sort_keys=False,
            ),
            end='',
        )
    return 0

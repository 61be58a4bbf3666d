"""Submit pretraining and evaluation jobs through submitit (SLURM; or local processes, or this process).

    skipssl-submit pretrain --config configs/dino_skipat_vit_s16_100ep.yaml --nodes 2 --gpus-per-node 8 \\
        --partition gpu --time 2-00:00:00 data.train_shards=/data/in1k-shards experiment.output_dir=runs/skipat_s16
    skipssl-submit knn --checkpoint runs/skipat_s16 --train-shards T --test-shards V --gpus-per-node 1 \\
        [-- KNN_EVAL_ARGS]
    skipssl-submit linear --checkpoint runs/skipat_s16 --train-shards T --test-shards V [-- LINEAR_PROBE_ARGS]
    skipssl-submit report runs/vit_s16 runs/skipat_s16 [-- REPORT_ARGS]
    skipssl-submit pipeline --config C --nodes 2 --gpus-per-node 8 --eval-train-shards T \\
        --eval-test-shards V \\
        [overrides]    # pretraining, then k-NN and linear probe (afterok), then the report (afterok)

Everything is checked before submission (config keys and types, shards, model, epoch size against the world
size, scheduler arguments), so a typo fails here and not after hours in the queue (exit status 2).
"""

import argparse
import dataclasses
import re
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from skipssl_common.artefacts import RunSummary

from . import executor as ex
from .jobs import ENTRY_POINTS, EntryPointJob, PretrainJob, available_entry_points

PROG = 'skipssl-submit'


class UsageError(ValueError):
    """Bad arguments, found before anything is submitted."""


class JobError(RuntimeError):
    """A local or debug job (run in the foreground) failed or stopped."""


# ---------------------------------------------------------------- validation (login node, before submitting)


def resolve_pretrain_config(config: str, overrides: List[str], res: ex.Resources):
    """The config as the job will run it, checked as far as it can be without the job's devices: keys, types,
    shards, epoch size for the job's world size, model; engine.device agrees with the GPUs asked for.
    Raises skipssl.config.ConfigError naming the key."""
    from skipssl.config import ConfigError, load_config
    from skipssl.runlock import check_free
    from skipssl.train import preflight
    from skipssl.train.plan import make_plan, model_spec
    from skipssl.train.state import check_resumable, newest_layout

    cfg = load_config(config, overrides)
    device, gpus = cfg.engine.device, res.gpus_per_node
    if device == 'auto':
        device = 'cuda' if gpus else 'cpu'
    if device == 'cuda' and not gpus:
        raise ConfigError(
            'engine.device: cuda, but the job asks for no GPU: pass --gpus-per-node N (one task per '
            'GPU), or engine.device=cpu with --tasks-per-node N for CPU ranks'
        )
    if device == 'cpu' and gpus:
        raise ConfigError(
            f'engine.device: cpu, but the job asks for --gpus-per-node {gpus}: set '
            'engine.device=cuda (or auto), or --gpus-per-node 0'
        )
    if device not in ('cpu', 'cuda'):
        raise ConfigError(f'engine.device: {device!r} is not one of auto, cuda, cpu')
    engine = dataclasses.replace(cfg.engine, device=device)
    data = cfg.data
    if data.train_shards and Path(data.train_shards).exists():
        data = dataclasses.replace(data, train_shards=str(Path(data.train_shards).resolve()))
    experiment = dataclasses.replace(cfg.experiment, output_dir=str(Path(cfg.experiment.output_dir).resolve()))
    cfg = dataclasses.replace(cfg, engine=engine, data=data, experiment=experiment)
    # this machine's devices are not the job's: check the rest on CPU (the precision for CPU jobs only, against
    # this machine's CPU, which is the job's with --cluster local or debug; the job checks its own at start-up)
    preflight(
        cfg
        if device == 'cpu'
        else dataclasses.replace(cfg, engine=dataclasses.replace(engine, device='cpu', precision='fp32'))
    )
    run_dir = Path(cfg.experiment.output_dir)
    try:
        make_plan(cfg, res.world_size, newest_layout(run_dir / 'checkpoints'))
    except ValueError as exn:
        raise ConfigError(f'data.batch_size_per_rank: {exn}') from exn
    check_free(run_dir)
    if not cfg.train.restart_if_no_valid_checkpoint:  # else the job decides (and moves unusable ones aside)
        check_resumable(run_dir / 'checkpoints', res.world_size, model_spec(cfg), cfg.data.batch_size_per_rank)
    return cfg


def check_shards(spec: str, option: str, allow_pipe: bool = False) -> str:
    from skipssl.data import resolve_shards

    try:
        resolve_shards(spec, allow_pipe=allow_pipe)
    except (FileNotFoundError, ValueError) as exn:
        raise UsageError(f'{option}: {exn}') from exn
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def check_checkpoint(spec: str) -> str:
    from skipssl_eval.source import looks_like_path

    if looks_like_path(spec):
        if not Path(spec).exists():
            raise UsageError(f'--checkpoint: {spec} does not exist')
        return str(Path(spec).resolve())
    return spec  # a timm model name (random-init baseline) or 'pixels'


def run_dir_of(spec: str) -> Optional[Path]:
    from skipssl_eval.source import find_run_dir

    return find_run_dir(Path(spec)) if Path(spec).exists() else None


def check_entry_point(kind: str) -> None:
    if kind not in available_entry_points():
        raise UsageError(f'the {kind} evaluator is not available in this checkout')


# ---------------------------------------------------------------- output


def say(msg: str = '') -> None:
    print(msg, flush=True)


def describe_job(kind: str, job, res: ex.Resources, extra: str = '') -> None:
    say(f'{kind} job {job.job_id} submitted ({res.describe()}){extra}')
    say(f'  logs: {job.paths.folder}  ({job.job_id}_<task>_log.out / .err)')


def _folder(args, default_root: Path) -> Path:
    """--folder, else RUN/submitit/%j on SLURM (one folder per job) and RUN/submitit elsewhere (submitit's local
    controller would create a literal '%j' folder)."""
    if args.folder:
        return Path(args.folder)
    root = Path(default_root) / 'submitit'
    return root / '%j' if args.cluster == 'slurm' else root


def _wait(job, kind: str):
    """Local and debug jobs run now; their results (or errors) are reported here."""
    say(f'{kind}: waiting for job {job.job_id} ({"in this process" if job.job_id.startswith("DEBUG") else "local"})')
    try:
        return job.results()
    except Exception as exn:  # the job's own error (debug) or submitit's report of it (local)
        root = root_error(job)
        raise JobError(
            f'{kind} job {job.job_id} failed: {root or exn}' + (f' (logs: {job.paths.folder})' if root else '')
        ) from exn


def root_error(job) -> Optional[str]:
    """The line a failing rank of a multi-task job printed (skipssl.failure): submitit reports task 0, which may
    only say that it stopped because another rank failed."""
    for path in sorted(Path(job.paths.folder).glob(f'{job.job_id}_*_log.err')):
        for line in path.read_text(errors='replace').splitlines():
            if re.match(r'rank \d+: ', line) and not line.split(': ', 1)[1].startswith('stopping'):
                return line
    return None


# ---------------------------------------------------------------- commands


def cmd_pretrain(args, passthrough: List[str]) -> int:
    res = ex.resources_from_args(args, max_requeues=args.max_requeues)
    cfg = resolve_pretrain_config(args.config, list(args.overrides) + passthrough, res)
    job = submit_pretrain(cfg, res, args)
    finish_pretrain(job, cfg, res)
    return 0


def submit_pretrain(cfg, res: ex.Resources, args):
    run_dir = Path(cfg.experiment.output_dir)
    job = ex.submit(
        PretrainJob(cfg, res.max_requeues), res, _folder(args, run_dir), args.job_name or 'skipssl-pretrain'
    )
    describe_job('pretrain', job, res, f', at most {res.max_requeues} requeue(s)')
    say(f'  run folder: {run_dir}')
    say(f'  tensorboard: tensorboard --logdir {run_dir / "tb"}')
    return job


def finish_pretrain(job, cfg, res: ex.Resources) -> Optional[RunSummary]:
    if res.cluster == 'slurm':
        return None
    summary = RunSummary.from_dict(_wait(job, 'pretrain')[0], f'the result of pretrain job {job.job_id}')
    state = 'finished' if summary.finished else f'stopped ({summary.stopped_by or "iteration limit"})'
    say(
        f'pretrain: {state} at iteration {summary.iterations} ({summary.device_hours:.4f} '
        f'{summary.device_hours_unit}); run folder {cfg.experiment.output_dir}'
    )
    return summary


def eval_argv(kind: str, checkpoint: str, train_shards: str, test_shards: str, extra: List[str]) -> List[str]:
    return ['--checkpoint', checkpoint, '--train-shards', train_shards, '--test-shards', test_shards, *extra]


def cmd_eval(args, passthrough: List[str]) -> int:
    check_entry_point(args.command)
    res = ex.resources_from_args(args)
    checkpoint = check_checkpoint(args.checkpoint)
    pipes = '--allow-pipe-shards' in passthrough
    train = check_shards(args.train_shards, '--train-shards', pipes)
    test = check_shards(args.test_shards, '--test-shards', pipes)
    root = run_dir_of(checkpoint) or Path.cwd()
    argv = eval_argv(args.command, checkpoint, train, test, passthrough)
    job = ex.submit(
        EntryPointJob(args.command, argv), res, _folder(args, root), args.job_name or f'skipssl-{args.command}'
    )
    describe_job(args.command, job, res)
    say(f'  command: {ENTRY_POINTS[args.command][0]} {shlex.join(argv)}')
    if res.cluster != 'slurm':
        _wait(job, args.command)
        say(f'{args.command}: done')
    return 0


def cmd_report(args, passthrough: List[str]) -> int:
    check_entry_point('report')
    res = ex.resources_from_args(args)
    runs = [str(Path(r).resolve()) for r in args.run_dirs]
    for r in runs:
        if not Path(r).is_dir():
            raise UsageError(f'run folder {r} does not exist')
    argv = [*runs, *passthrough]
    job = ex.submit(EntryPointJob('report', argv), res, _folder(args, Path(runs[0])), args.job_name or 'skipssl-report')
    describe_job('report', job, res)
    if res.cluster != 'slurm':
        _wait(job, 'report')
    return 0


def cmd_pipeline(args, passthrough: List[str]) -> int:
    res = ex.resources_from_args(args, max_requeues=args.max_requeues)
    eval_res = ex.resources_from_args(args, prefix='eval_', base=res)
    small = dataclasses.replace(eval_res, nodes=1, gpus_per_node=0, tasks_per_node=1, cpus_per_task=1, time_min=60)
    cfg = resolve_pretrain_config(args.config, list(args.overrides) + passthrough, res)
    run_dir = Path(cfg.experiment.output_dir)
    available = available_entry_points()
    evals = [k for k in ('knn', 'linear') if k in available]
    skipped = [k for k in ('knn', 'linear', 'report') if k not in available or (k == 'report' and not evals)]
    extra = {
        'knn': shlex.split(args.knn_args or ''),
        'linear': shlex.split(args.linear_args or ''),
        'report': shlex.split(args.report_args or ''),
    }
    if evals:
        if not (args.eval_train_shards and args.eval_test_shards):
            raise UsageError(
                'pipeline: --eval-train-shards and --eval-test-shards (labelled shards) are needed for '
                'the k-NN and linear-probe jobs'
            )
        pipes = all('--allow-pipe-shards' in extra[k] for k in evals)
        train = check_shards(args.eval_train_shards, '--eval-train-shards', pipes)
        test = check_shards(args.eval_test_shards, '--eval-test-shards', pipes)
    folder = _folder(args, run_dir)
    name = args.job_name or 'skipssl'
    slurm = res.cluster == 'slurm'

    pre = submit_pretrain(cfg, res, args)
    if not slurm:
        summary = finish_pretrain(pre, cfg, res)
        if not summary.finished:
            raise JobError('pipeline: pretraining did not finish; evaluation not started')
    eval_jobs = []
    for kind in evals:
        argv = eval_argv(kind, str(run_dir), train, test, extra[kind])
        job = ex.submit(
            EntryPointJob(kind, argv),
            eval_res,
            folder,
            f'{name}-{kind}',
            dependency=ex.dependency_after([pre]) if slurm else None,
        )
        describe_job(kind, job, eval_res, f', after pretrain job {pre.job_id} (afterok)' if slurm else '')
        if not slurm:
            _wait(job, kind)
        eval_jobs.append(job)
    if 'report' in available and eval_jobs:
        job = ex.submit(
            EntryPointJob('report', [str(run_dir), *extra['report']]),
            small,
            folder,
            f'{name}-report',
            dependency=ex.dependency_after([pre, *eval_jobs]) if slurm else None,
        )
        after = ', '.join(j.job_id for j in [pre, *eval_jobs])
        describe_job('report', job, small, f', after {after} (afterok)' if slurm else '')
        if not slurm:
            _wait(job, 'report')
    if skipped:
        say(f'not submitted (evaluator not available in this checkout): {", ".join(skipped)}')
    say(f'report: {run_dir / "report" / "report.md"} once the jobs are done')
    return 0


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split('\n')[0],
        allow_abbrev=False,
        epilog='Arguments after `--` go to the evaluator (knn, linear, report) or are more '
        'config overrides (pretrain, pipeline).',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest='command', required=True, metavar='{pretrain,knn,linear,report,pipeline}')

    def requeue_args(q):
        q.add_argument(
            '--max-requeues',
            type=int,
            default=10,
            help='how often the job may requeue itself after preemption / time-out (default 10)',
        )

    q = sub.add_parser(
        'pretrain', help='DINO pretraining (requeues itself on preemption and time-out)', allow_abbrev=False
    )
    q.add_argument('--config', required=True, help='experiment YAML (configs/*.yaml)')
    q.add_argument('overrides', nargs='*', help='dotted overrides, e.g. train.epochs=10')
    requeue_args(q)
    ex.add_arguments(q)

    for kind, what in (('knn', 'weighted k-NN (knn_eval.py)'), ('linear', 'linear probe (linear_probe.py)')):
        q = sub.add_parser(kind, help=f'{what} of a checkpoint', allow_abbrev=False)
        q.add_argument('--checkpoint', required=True, help='run folder, checkpoint folder, export, timm name, pixels')
        q.add_argument('--train-shards', required=True, help='labelled training shards')
        q.add_argument('--test-shards', required=True, help='labelled test shards')
        ex.add_arguments(q, defaults={'time': '4:00:00'})

    q = sub.add_parser('report', help='accuracy against device-hours (skipssl-report)', allow_abbrev=False)
    q.add_argument('run_dirs', nargs='+')
    ex.add_arguments(q, defaults={'time': '30'})

    q = sub.add_parser(
        'pipeline', help='pretrain, then k-NN and linear probe (afterok), then the report', allow_abbrev=False
    )
    q.add_argument('--config', required=True)
    q.add_argument('overrides', nargs='*')
    q.add_argument('--eval-train-shards', help='labelled training shards of the evaluations')
    q.add_argument('--eval-test-shards', help='labelled test shards of the evaluations')
    q.add_argument('--knn-args', help='more knn_eval.py arguments, one string (e.g. "--k 10 20")')
    q.add_argument('--linear-args', help='more linear_probe.py arguments, one string (e.g. "--epochs 50")')
    q.add_argument('--report-args', help='more skipssl_eval.report arguments, one string')
    requeue_args(q)
    ex.add_arguments(q, help_suffix=' (pretraining)')
    ex.add_arguments(q, prefix='eval-', defaults={'time': '4:00:00'}, help_suffix=' (k-NN and linear probe)')
    return p


COMMANDS = {
    'pretrain': cmd_pretrain,
    'knn': cmd_eval,
    'linear': cmd_eval,
    'report': cmd_report,
    'pipeline': cmd_pipeline,
}


def split_passthrough(argv: List[str]) -> Tuple[List[str], List[str]]:
    if '--' in argv:
        i = argv.index('--')
        return argv[:i], argv[i + 1 :]
    return argv, []


def main(argv: Optional[List[str]] = None) -> int:
    from skipssl.checkpoint import CheckpointError
    from skipssl.config import ConfigError
    from skipssl.runlock import RunFolderError

    ours, passthrough = split_passthrough(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(ours)
    try:
        return COMMANDS[args.command](args, passthrough)
    except ConfigError as exn:
        print(f'{PROG} {args.command}: config error (nothing submitted): {exn}', file=sys.stderr)
        return 2
    except (UsageError, ex.SubmitError, RunFolderError, CheckpointError) as exn:
        print(f'{PROG} {args.command}: error (nothing submitted): {exn}', file=sys.stderr)
        return 2
    except JobError as exn:
        print(f'{PROG} {args.command}: {exn}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())

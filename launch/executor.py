"""One submission function for every job kind: the executor set-up from the common scheduler arguments.

``--cluster slurm`` (default) submits through submitit's SLURM executor; ``local`` runs the same job as local
processes (submitit's local executor: one process per task, the time limit and its signal enforced, requeue by
restarting the tasks); ``debug`` runs it in this process (submitit's debug executor: one task, no scheduler).
"""

import argparse
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import submitit

CLUSTERS = ('slurm', 'local', 'debug')
DEFAULT_TIME = '24:00:00'
# Seconds between the time-out signal and the time limit: one iteration and a checkpoint must fit in it.
DEFAULT_SIGNAL_DELAY_S = 120


class SubmitError(ValueError):
    """Bad scheduler arguments, found before anything is submitted."""


def parse_time(text: str) -> int:
    """SLURM's time formats (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``) in whole
    minutes, rounded up (submitit's unit)."""
    m = re.fullmatch(r'(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?', text.strip())
    if not m:
        raise SubmitError(f'--time {text!r}: expected minutes, HH:MM:SS or D-HH:MM:SS')
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # MM:SS
        seconds = int(a) * 60 + int(b)
    else:  # MM
        seconds = int(a) * 60
    if seconds <= 0:
        raise SubmitError(f'--time {text!r} must be positive')
    return -(-seconds // 60)


def parse_mem(text: Optional[str]) -> Optional[float]:
    """``--mem`` as SLURM reads it (``64G``, ``500M``, ``1T``; a bare number is MB) in GB."""
    if text is None:
        return None
    m = re.fullmatch(r'(\d+(?:\.\d+)?)\s*([KMGT]?)B?', text.strip().upper())
    if not m:
        raise SubmitError(f'--mem {text!r}: expected e.g. 64G or 500M')
    value, unit = float(m.group(1)), m.group(2) or 'M'
    return value * {'K': 1 / 1024**2, 'M': 1 / 1024, 'G': 1, 'T': 1024}[unit]


@dataclass
class Resources:
    """What a job asks the scheduler for."""

    cluster: str = 'slurm'
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: Optional[int] = None  # default: one per GPU, else 1
    cpus_per_task: Optional[int] = None  # default: 10 with GPUs, else 1
    time_min: int = 24 * 60
    mem_gb: Optional[float] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    signal_delay_s: int = DEFAULT_SIGNAL_DELAY_S
    max_requeues: int = 10
    extra_sbatch: Dict[str, Any] = field(default_factory=dict)

    @property
    def ntasks_per_node(self) -> int:
        if self.tasks_per_node:
            return self.tasks_per_node
        return self.gpus_per_node or 1

    @property
    def ncpus_per_task(self) -> int:
        return self.cpus_per_task or (10 if self.gpus_per_node else 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    def check(self) -> 'Resources':
        if self.cluster not in CLUSTERS:
            raise SubmitError(f'--cluster {self.cluster!r}: one of {", ".join(CLUSTERS)}')
        for name in ('nodes', 'time_min', 'max_requeues', 'signal_delay_s'):
            if getattr(self, name) < (0 if name in ('max_requeues', 'signal_delay_s') else 1):
                raise SubmitError(f'--{name.replace("_", "-")} must be positive, got {getattr(self, name)}')
        if self.gpus_per_node < 0 or (self.tasks_per_node is not None and self.tasks_per_node < 1):
            raise SubmitError('--gpus-per-node must be >= 0 and --tasks-per-node >= 1')
        if self.gpus_per_node and self.tasks_per_node and self.tasks_per_node != self.gpus_per_node:
            raise SubmitError(
                f'one task per GPU: --tasks-per-node {self.tasks_per_node} differs from '
                f'--gpus-per-node {self.gpus_per_node} (leave --tasks-per-node out on GPU nodes)'
            )
        if self.signal_delay_s >= self.time_min * 60:
            raise SubmitError(
                f'--signal-delay {self.signal_delay_s} s is not shorter than the time limit '
                f'({self.time_min} min): the job would be told to stop as it starts'
            )
        if self.cluster != 'slurm' and self.nodes > 1:
            raise SubmitError(f'--cluster {self.cluster} runs on this machine only: --nodes must be 1')
        if self.cluster == 'debug' and self.world_size > 1:
            raise SubmitError(
                f'--cluster debug runs one task in this process: use --cluster local for {self.world_size} tasks'
            )
        return self

    def describe(self) -> str:
        gpus = f'{self.gpus_per_node} GPU(s) per node' if self.gpus_per_node else 'no GPU'
        return (
            f'{self.cluster}: {self.nodes} node(s) x {self.ntasks_per_node} task(s), {gpus}, '
            f'{self.ncpus_per_task} CPU(s) per task, {self.time_min} min'
        )


def add_arguments(
    parser: argparse.ArgumentParser, prefix: str = '', defaults: Optional[Dict] = None, help_suffix: str = ''
) -> None:
    """The scheduler arguments (``--nodes``, ``--partition``, ...); with a prefix (``eval-``) for a second set."""
    d = {'nodes': 1, 'gpus_per_node': 0, 'time': DEFAULT_TIME, **(defaults or {})}
    g = parser.add_argument_group(f'{prefix}scheduler{help_suffix}')
    p = f'--{prefix}'
    if not prefix:
        g.add_argument(
            '--cluster',
            default='slurm',
            choices=CLUSTERS,
            help='slurm (default); local: tasks as processes on this machine; debug: in this process',
        )
        g.add_argument('--folder', help='submitit log folder (default: RUN_DIR/submitit/%%j)')
        g.add_argument('--job-name', help='SLURM job name (default: skipssl-KIND)')
    g.add_argument(f'{p}nodes', type=int, default=d['nodes'])
    g.add_argument(f'{p}gpus-per-node', type=int, default=d['gpus_per_node'], help='one task per GPU')
    g.add_argument(
        f'{p}tasks-per-node',
        type=int,
        help='tasks (ranks) per node without GPUs (default 1); with GPUs it equals --gpus-per-node',
    )
    g.add_argument(f'{p}cpus-per-task', type=int, help='default: 10 with GPUs, else 1 (also OMP_NUM_THREADS)')
    g.add_argument(f'{p}time', default=d['time'], help=f'time limit: minutes, HH:MM:SS or D-HH:MM:SS ({d["time"]})')
    g.add_argument(f'{p}mem', help='memory per node, as SLURM reads it: 64G, 500M (a bare number is MB)')
    if not prefix:
        for name in ('partition', 'account', 'qos', 'constraint', 'exclude'):
            g.add_argument(f'--{name}')
        g.add_argument(
            '--signal-delay',
            type=int,
            default=DEFAULT_SIGNAL_DELAY_S,
            help='seconds before the time limit at which the job is told to checkpoint and requeue '
            f'(default {DEFAULT_SIGNAL_DELAY_S})',
        )


def resources_from_args(
    args: argparse.Namespace, prefix: str = '', base: Optional[Resources] = None, **overrides
) -> Resources:
    """Resources from the arguments of :func:`add_arguments` (with ``prefix``); the cluster, partition, account,
    QoS, constraint, exclude and signal delay are shared with ``base`` when given."""
    key = prefix.replace('-', '_')

    def get(name):
        return getattr(args, key + name)

    shared = ('cluster', 'partition', 'account', 'qos', 'constraint', 'exclude', 'signal_delay_s')
    if base is not None:
        common = {k: getattr(base, k) for k in shared}
    else:
        common = {
            'cluster': args.cluster,
            'partition': args.partition,
            'account': args.account,
            'qos': args.qos,
            'constraint': args.constraint,
            'exclude': args.exclude,
            'signal_delay_s': args.signal_delay,
        }
    res = Resources(
        nodes=get('nodes'),
        gpus_per_node=get('gpus_per_node'),
        tasks_per_node=get('tasks_per_node'),
        cpus_per_task=get('cpus_per_task'),
        time_min=parse_time(get('time')),
        mem_gb=parse_mem(get('mem')),
        **common,
    )
    return replace(res, **overrides).check()


def make_executor(res: Resources, folder: Path, name: str, dependency: Optional[str] = None):
    """The submitit executor for ``res``; ``dependency`` (SLURM syntax, e.g. ``afterok:123``) only on SLURM."""
    threads = res.ncpus_per_task
    setup = [f'export OMP_NUM_THREADS={threads}']
    if res.cluster == 'slurm':
        ex = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=res.max_requeues)
        sbatch = {'requeue': True, **res.extra_sbatch}
        params: Dict[str, Any] = {
            'job_name': name,
            'nodes': res.nodes,
            'ntasks_per_node': res.ntasks_per_node,
            'cpus_per_task': threads,
            'time': res.time_min,
            'signal_delay_s': res.signal_delay_s,
            'setup': setup,
            # a task that fails ends the job's other tasks at once (as torchrun's agent does), whatever they wait in
            'srun_args': ['--kill-on-bad-exit=1'],
            'additional_parameters': sbatch,
        }
        if res.gpus_per_node:
            params['gpus_per_node'] = res.gpus_per_node
        if res.mem_gb is not None:
            params['mem'] = f'{max(1, round(res.mem_gb * 1024))}M'
        if dependency:
            params['dependency'] = dependency
            sbatch['kill-on-invalid-dep'] = 'yes'  # a failed dependency cancels the job instead of parking it
        for key in ('partition', 'account', 'qos', 'constraint', 'exclude'):
            if getattr(res, key):
                params[key] = getattr(res, key)
    elif res.cluster == 'local':
        ex = submitit.LocalExecutor(folder=str(folder), max_num_timeout=res.max_requeues)
        params = {
            'nodes': 1,
            'tasks_per_node': res.ntasks_per_node,
            'gpus_per_node': res.gpus_per_node,
            'timeout_min': res.time_min,
            'signal_delay_s': res.signal_delay_s,
            'setup': setup,
        }
    else:
        ex = submitit.DebugExecutor(folder=str(folder))
        params = {}
    ex.update_parameters(**params)
    return ex


def submit(fn, res: Resources, folder: Path, name: str, dependency: Optional[str] = None) -> submitit.Job:
    """Submit the callable ``fn()`` (a job of :mod:`skipssl_launch.jobs`) with the resources ``res``."""
    Path(str(folder).split('%j')[0]).mkdir(parents=True, exist_ok=True)
    return make_executor(res, folder, name, dependency).submit(fn)


def dependency_after(jobs: List[submitit.Job]) -> Optional[str]:
    """SLURM's ``afterok`` on all of ``jobs`` (None for none)."""
    ids = [j.job_id for j in jobs if j is not None]
    return 'afterok:' + ':'.join(ids) if ids else None

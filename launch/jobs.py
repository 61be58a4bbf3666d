"""The callables submitit runs, one small class per job kind; each runs on every task of its job.

- :class:`PretrainJob`: ``skipssl.train.pretrain(cfg)`` with the config resolved and validated at submission
  (pickled with the job, so editing the YAML while the job waits in the queue or between requeues changes
  nothing). It resumes from the newest checkpoint of the run folder, so a requeued run goes on where the
  stopped one saved; the requeue decisions are :mod:`skipssl_launch.preemption`'s.
- :class:`EntryPointJob`: an evaluation entry point (``knn_eval.py``, ``linear_probe.py``,
  ``skipssl-report``) called with its own command line; a non-zero exit status fails the job (so
  SLURM dependencies ``afterok`` on it are never satisfied).

Both are ``submitit.helpers.Checkpointable``: should submitit's own preemption handler ever run (a signal in
the instant between submitit installing it and the job replacing it), it resubmits the same job, which
resumes from the run folder.
"""

import importlib.util
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import submitit

from .environment import TaskInfo, export_torch_env, task_info
from .preemption import OutsideTraining, Requeue, RequeueError

log = logging.getLogger('launch')
ROOT = Path(__file__).resolve().parents[1]


class JobFailed(RuntimeError):
    pass


def _setup_logging(info: TaskInfo) -> None:
    """The job's own messages (requeues, signals) in the task's .err log, stamped like the trainer's."""
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f'%(asctime)s [rank {info.rank}] %(levelname)s %(name)s: %(message)s'))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _drop_stale_result(info: TaskInfo) -> None:
    """A requeued run must not leave a previous run's result (e.g. an error of a rank that lost its peer when
    SLURM killed the job) for the client to find before this run's own."""
    if info.cluster == 'debug':
        return
    try:
        submitit.JobEnvironment().paths.result_pickle.unlink(missing_ok=True)
    except (OSError, KeyError, RuntimeError):
        pass


def _log_folder(info: TaskInfo) -> Optional[Path]:
    if info.cluster == 'debug':
        return None
    try:
        return Path(submitit.JobEnvironment().paths.folder)
    except (KeyError, RuntimeError):
        return None


class PretrainJob(submitit.helpers.Checkpointable):
    """Pickled with the resolved config as plain data: unpickling must not import torch, so that the job
    replaces submitit's signal handler within milliseconds of its start."""

    def __init__(self, cfg, max_requeues: int = 10) -> None:
        self.config = cfg.to_dict()
        self.max_requeues = max_requeues

    @property
    def cfg(self):
        from skipssl.config import config_from_dict

        return config_from_dict(self.config)

    def __call__(self) -> Dict[str, Any]:
        info = task_info()
        _setup_logging(info)
        requeue = Requeue(info, self.max_requeues, _log_folder(info))
        # before anything slow: submitit's own handler must not end rank 0 in the middle of a collective
        outside = OutsideTraining(requeue).install() if info.cluster != 'debug' else None
        _drop_stale_result(info)
        torch_env = export_torch_env(info)
        # where each rank ran and whom it meets: what to read first when a multi-node rendezvous hangs
        # (SLURM's node name: several nodes may share one host name, as the test cluster's do)
        node = os.environ.get('SLURMD_NODENAME') or socket.gethostname()
        log.info(
            'rank %d of %d on node %s, rendezvous %s:%s',
            info.rank,
            info.world_size,
            node,
            torch_env['MASTER_ADDR'],
            torch_env['MASTER_PORT'],
        )
        cfg = self.cfg
        from skipssl.train import pretrain

        summary = pretrain(cfg)
        if outside is not None:
            outside.quiet()
        if summary.finished or not summary.stopped_by:
            return summary.to_dict()  # the job's result: plain data, readable without skipssl
        requeue.after_stop(summary.stopped_by, summary.iterations)  # exits unless debug or SIGINT
        raise RequeueError(
            requeue.limit_message(
                f'stopped by {summary.stopped_by} at iteration {summary.iterations} (checkpoint written)'
            )
        )

    def checkpoint(self, *args, **kwargs) -> Optional[submitit.helpers.DelayedSubmission]:
        info = task_info()
        if not Requeue(info, self.max_requeues, _log_folder(info)).allowed:
            return None  # submitit then ends the job with "checkpoint function returned None"
        return super().checkpoint(*args, **kwargs)


ENTRY_POINTS = {
    # kind: (program name, module, function)
    'knn': ('knn_eval.py', 'skipssl_eval.commands', 'knn_main'),
    'linear': ('linear_probe.py', 'skipssl_eval.commands', 'linear_main'),
    'report': ('skipssl-report', 'skipssl_eval.report', 'main'),
}


def entry_point(kind: str):
    """The ``main(argv)`` of an evaluation entry point; None when its module is not installed."""
    _, module, fn = ENTRY_POINTS[kind]
    try:
        return getattr(importlib.import_module(module), fn)
    except ImportError:
        return None


def available_entry_points() -> List[str]:
    """Job kinds whose entry point's module is installed (found without importing it: launch starts fast)."""
    return [kind for kind, (_, module, _) in ENTRY_POINTS.items() if importlib.util.find_spec(module) is not None]


class EntryPointJob(submitit.helpers.Checkpointable):
    def __init__(self, kind: str, argv: List[str]) -> None:
        if kind not in ENTRY_POINTS:
            raise ValueError(f'unknown job kind {kind!r} (one of {", ".join(ENTRY_POINTS)})')
        self.kind = kind
        self.argv = list(argv)

    def __call__(self) -> Dict[str, Any]:
        info = task_info()
        _drop_stale_result(info)
        export_torch_env(info)
        prog = ENTRY_POINTS[self.kind][0]
        main = entry_point(self.kind)
        if main is None:
            raise JobFailed(f'{prog} is not available in {ROOT}')
        sys.stdout.flush()
        status = main(self.argv)
        if status:
            raise JobFailed(f"{prog} {' '.join(self.argv)} exited with status {status} (see the task's .err log)")
        return {'kind': self.kind, 'argv': self.argv, 'rank': info.rank, 'status': 0, 'pid': os.getpid()}

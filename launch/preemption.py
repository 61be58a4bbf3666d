"""Preemption and time-out of a training job: who saves, who requeues, and how often.

The trainer owns the signals while it trains: on SIGTERM / SIGUSR1 / SIGUSR2 (SLURM's preemption notice,
submitit's ``--signal=USR2@delay`` before the time limit) every rank finishes its iteration, they agree by an
all-reduce, save one checkpoint together (a collective DeepSpeed save) and ``pretrain`` returns with
``stopped_by`` set. Then :meth:`Requeue.after_stop` requeues the job (rank 0: ``scontrol requeue``, if
SLURM still shows it running: a job SLURM requeued itself is not requeued twice, and a cancelled one stays
cancelled) and every rank exits without writing a submitit result, so the client keeps waiting for the
requeued run, which resumes from that checkpoint.

Outside the trainer's window (start-up before its handlers are installed, tear-down after they are removed)
:class:`OutsideTraining` replaces submitit's own handler, which would raise SystemExit on rank 0 wherever it
happens to be (in the middle of a collective, leaving the other ranks to fail and write error results).
Nothing is lost there: before training nothing was done since the newest checkpoint, after it the trainer
has saved. So on the preemption / time-out signal rank 0 requeues at once and every rank waits for SLURM to
end the job; SIGTERM alone (SLURM's kill notice, which precedes the kill after KillWait) is only logged.

Requeues are counted against ``max_requeues``: SLURM's own SLURM_RESTART_COUNT (which also counts
preemptions SLURM requeued by itself), a counter file next to the job's logs for the local executor.
"""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE  # a task exiting with it restarts a local job

from .environment import TaskInfo

log = logging.getLogger('launch')

# submitit's preemption signal (SUBMITIT_PREEMPT_SIGNAL, default USR2), SLURM's other notices
PREEMPT_SIGNAL = getattr(signal, 'SIG' + os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2'))
STOP_SIGNALS = tuple(dict.fromkeys((PREEMPT_SIGNAL, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)))
# Signals that mean "you are going to be stopped: save and come back". SIGINT means "stop": never requeued.
REQUEUE_ON = {s.name for s in STOP_SIGNALS}
REQUEUED_STATES = {'PENDING', 'REQUEUED', 'REQUEUE_HOLD', 'REQUEUE_FED', 'COMPLETING', 'CONFIGURING'}


class RequeueError(RuntimeError):
    """The job was stopped but is not requeued (limit reached, job cancelled, requeue failed); the message says
    how to go on."""


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _scontrol_state(job_id: str, tries: int = 3) -> dict:
    """``scontrol show job``'s fields; retried, since SLURM's SIGTERM to every process of a job being requeued
    or cancelled can end the scontrol process too."""
    for attempt in range(tries):
        try:
            out = subprocess.run(
                ['scontrol', 'show', 'job', '-o', job_id], capture_output=True, text=True, timeout=60, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError) as exn:
            raise RequeueError(f'cannot ask SLURM about job {job_id}: {exn}') from exn
        state = dict(item.split('=', 1) for item in out.split() if '=' in item)
        if state.get('JobState'):
            return state
        time.sleep(0.5 * (attempt + 1))
    return {}


class Requeue:
    """Requeue decisions of one task of a training job. The restart count is read once, at start, so that
    every rank decides alike."""

    def __init__(self, info: TaskInfo, max_requeues: int, log_folder: Optional[Path] = None) -> None:
        self.info = info
        self.max_requeues = max_requeues
        self.counter = Path(log_folder) / f'{info.job_id}_requeues' if log_folder else None
        self.restarts = self._read_restarts()
        self.requeued = False

    def _read_restarts(self) -> int:
        if self.info.cluster == 'slurm':
            return int(os.environ.get('SLURM_RESTART_COUNT', '0') or 0)
        if self.counter is not None and self.counter.exists():
            return int(self.counter.read_text().strip() or 0)
        return 0

    @property
    def allowed(self) -> bool:
        return self.info.cluster in ('slurm', 'local') and self.restarts < self.max_requeues

    def limit_message(self, what: str) -> str:
        if self.info.cluster not in ('slurm', 'local'):
            return f'{what}; {self.info.cluster} jobs are not requeued: run the same command again to resume'
        return (
            f'{what}; not requeued: {self.restarts} requeue(s) done, the maximum is {self.max_requeues} '
            f'(--max-requeues). Submit the same command again to resume from the newest checkpoint'
        )

    def _requeued_by_slurm(self, state: dict) -> bool:
        return state.get('JobState') in REQUEUED_STATES and int(state.get('Restarts', 0) or 0) > self.restarts

    def request(self, what: str) -> str:
        """Rank 0 has the job requeued, unless SLURM did already; returns 'requeued' or 'already'. Raises
        RequeueError when the job must not (or cannot) be requeued: the limit is reached, or SLURM is ending
        it (``scancel``: a cancelled job must stay cancelled, whatever signal the trainer saw first).
        The local executor requeues by exit status: this only counts."""
        if self.requeued:
            return 'already'
        if self.info.cluster == 'local':
            if not self.allowed:
                raise RequeueError(self.limit_message(what))
            self.requeued = True
            if self.counter is not None:
                self.counter.write_text(f'{self.restarts + 1}\n')
            return 'requeued'
        job = self.info.job_id
        state = _scontrol_state(job)
        if self._requeued_by_slurm(state):
            self.requeued = True
            log.warning(
                'job %s is already requeued by SLURM (JobState=%s Restarts=%s)',
                job,
                state.get('JobState'),
                state.get('Restarts'),
            )
            return 'already'
        if state.get('JobState') != 'RUNNING':
            raise RequeueError(
                f'{what}; not requeued: SLURM is ending job {job} (JobState={state.get("JobState")}, '
                'e.g. scancel). Submit the same command again to resume from the newest checkpoint'
            )
        if not self.allowed:
            raise RequeueError(self.limit_message(what))
        self.requeued = True
        res = subprocess.run(['scontrol', 'requeue', job], capture_output=True, text=True, timeout=60, check=False)
        if res.returncode == 0:
            log.warning('requeued job %s (requeue %d of at most %d)', job, self.restarts + 1, self.max_requeues)
            return 'requeued'
        # scontrol itself gets the SIGTERM SLURM sends every process of the job once the requeue is under way
        state = _scontrol_state(job)
        if self._requeued_by_slurm(state):
            log.warning(
                'requeued job %s (scontrol ended with %s; SLURM shows JobState=%s Restarts=%s)',
                job,
                res.returncode,
                state.get('JobState'),
                state.get('Restarts'),
            )
            return 'requeued'
        raise RequeueError(
            f'{what}; scontrol requeue {job} failed ({res.returncode}): {res.stderr.strip()} '
            f'(JobState={state.get("JobState")}). Submit the same command again to resume'
        )

    def exit_requeued(self, wait_for_kill: bool = False) -> None:
        """Leave without a submitit result (SystemExit passes submitit by), so the client waits for the rerun.
        ``wait_for_kill``: stay until SLURM ends the job instead (used inside a signal handler, where unwinding
        would run the trainer's tear-down collectives against ranks that are elsewhere)."""
        _flush()
        if self.info.cluster == 'local':
            os._exit(LOCAL_REQUEUE_RETURN_CODE)
        if wait_for_kill:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                time.sleep(1.0)
            log.error('job %s was requeued but not ended within 600 s; exiting', self.info.job_id)
            _flush()
            os._exit(1)
        sys.exit(0)

    def after_stop(self, stopped_by: str, iteration: int) -> None:
        """The trainer stopped on a signal and saved: rank 0 has the job requeued, every rank exits without a
        result. Returns only for a debug job or SIGINT (the caller reports the stop). Raises RequeueError when
        the job is not requeued (limit reached, job cancelled): the job then fails with the reason."""
        if stopped_by not in REQUEUE_ON or self.info.cluster == 'debug':
            return
        what = f'stopped by {stopped_by} at iteration {iteration} (checkpoint written)'
        if self.info.is_main or self.info.cluster == 'local':
            self.request(what)
        elif not self.allowed:
            raise RequeueError(self.limit_message(what))  # as rank 0 decides, unless SLURM requeued the job itself
        log.warning('%s; exiting for the requeued run to resume', what)
        self.exit_requeued()


class OutsideTraining:
    """Signal handling of a training job while the trainer's own handlers are not installed (see module doc)."""

    def __init__(self, requeue: Requeue) -> None:
        self.requeue = requeue
        self.received = []
        self.muted = False

    def install(self) -> 'OutsideTraining':
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)
        return self

    def quiet(self) -> None:
        """From here on (the job is being requeued, or is ending) signals are only logged."""
        self.muted = True

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        r = self.requeue
        if signum == signal.SIGTERM or self.muted or r.requeued or r.info.cluster == 'debug':
            log.warning(
                '%s received outside training: ignored (%s)',
                name,
                'the job is ending or requeued'
                if self.muted or r.requeued
                else 'the preemption signal or the kill decides',
            )
            return
        if r.info.cluster == 'slurm' and not r.info.is_main:
            log.warning('%s received outside training: rank 0 decides on the requeue', name)
            return
        log.warning('%s received outside training (nothing to save beyond the newest checkpoint): requeueing', name)
        try:
            r.request(f'{name} outside training')
        except RequeueError as exn:
            log.error('%s', exn)
            return
        r.exit_requeued(wait_for_kill=True)

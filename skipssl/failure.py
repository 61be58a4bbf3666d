"""One rank's failure ends the whole job within seconds, with its error printed once, first.

Without this, a rank that fails waits in a collective (a barrier in its tear-down, say) while its peers wait
in another one, and the job hangs for the collective time-out (10 minutes) with the real error buried among
every rank's tracebacks. Here:

- the failing rank claims the failure in the job's rendezvous store (the TCPStore at MASTER_ADDR:MASTER_PORT:
  torchrun's agent store, or rank 0's under srun/submitit), prints its error (one line for a user error, the
  traceback for an internal one), records its rank in the store and ends its process with ``os._exit``
  (no barrier, no tear-down that could wait for a peer). Its sockets close, so gloo peers' collectives fail
  at once; torchrun's agent and ``srun --kill-on-bad-exit`` end the rest.
- every rank runs a :class:`FailureWatch` thread that polls the store; when a peer has recorded a failure (or
  the store has been unreachable for ``STORE_LOST_S``), it prints one line, ``rank N: stopping because rank M
  failed``, and ends its process. This ends ranks stuck where no socket error reaches them (an NCCL kernel, a long
  step).
- a rank whose own error is a consequence (a lost connection, :class:`PeerFailed`) prints only that line.
- the watch threads also beat in the store (every ``BEAT_S``), and each one watches the next rank's beat: a rank
  that shows no sign of life for ``STALL_S`` (stopped with SIGSTOP, frozen, its host gone while its sockets
  stay open) would leave the others waiting in a collective without a word, so its watcher says so in one
  line, ``rank N: PROG: rank M has shown no sign of life for S s ...``, and ends the job as for rank M's error.
- before ``os._exit``, the run's logs are flushed (TensorBoard events, ``log.jsonl``: whatever registered with
  :meth:`FailureWatch.flush_at_exit`), for at most ``EXIT_FLUSH_S``.

Dependency-light on purpose: training and evaluation both use it, and it imports nothing of either.
"""

import json
import logging
import os
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import TYPE_CHECKING, Callable, List, NoReturn, Optional, Tuple

if TYPE_CHECKING:
    from torch.distributed import Store

FAILED_KEY = 'skipssl/failure/rank'  # the rank whose error was printed
CLAIM_KEY = 'skipssl/failure/claims'  # the first rank to add 1 is the root
ACK_KEY = 'skipssl/failure/acks'  # peers that have seen it
POLL_S = 0.25
ACK_WAIT_S = 3.0  # the root waits this long for its peers to print their line
FOLLOWER_DELAY_S = 1.0  # a follower outlives the root by this long
STORE_LOST_S = 30.0  # a store unreachable this long means the job is gone
ROOT_WAIT_S = 5.0  # a peer that lost contact waits this long for the root's record
BEAT_KEY = 'skipssl/failure/beat'  # /RANK: a counter each watch thread moves, or DONE once it has stopped
DONE = 'done'
BEAT_S = 1.0
# a rank whose watch thread has not beaten for this long is frozen: the thread runs every second through a long
# step or a checkpoint write, so only a process that does not run at all (or a C call that holds the GIL this
# long) falls silent; well under the collectives' own time-outs (NCCL 10 min, gloo 30 min). The environment
# variable is for tests.
STALL_S = float(os.environ.get('SKIPSSL_STALL_S', '300'))
EXIT_FLUSH_S = 5.0  # the most an exit waits for the logs (a hung file system must not keep a failed rank alive)

# Messages of errors that only say a peer went away (gloo, NCCL, the TCPStore).
_LOST_PEER = (
    'connection closed by peer',
    'connection reset by peer',
    'remote worker crashing',
    'nccl communicator was aborted',
)


class PeerFailed(RuntimeError):
    """This rank stops because another rank failed (e.g. rank 0 refused a collective decision)."""


def lost_peer(exn: BaseException) -> bool:
    """Whether ``exn`` (or what caused it) only says that another rank went away."""
    seen = 0
    current: Optional[BaseException] = exn
    while current is not None and seen < 8:
        if isinstance(current, PeerFailed):
            return True
        try:
            import torch.distributed as dist

            if isinstance(current, getattr(dist, 'DistNetworkError', ())):
                return True
        except ImportError:
            pass
        text = str(current).lower()
        if any(s in text for s in _LOST_PEER):
            return True
        current, seen = current.__cause__ or current.__context__, seen + 1
    return False


def first_line(exn: BaseException) -> str:
    """A one-line form of ``exn``: for an error re-raised from a data-loader worker (whose message is the
    worker's whole traceback), the original error's own last line."""
    lines = [ln.strip() for ln in str(exn).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exn).__name__
    if len(lines) > 1 and lines[0].startswith('Caught '):
        last = lines[-1]
        head, sep, rest = last.partition(': ')
        return rest if sep and all(part.isidentifier() for part in head.split('.')) else last
    return lines[0]


def _store(timeout_s: float = 10.0) -> Optional['Store']:
    """A new client of the job's rendezvous store (None when there is no multi-rank job)."""
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1 or 'MASTER_ADDR' not in os.environ:
        return None
    import torch.distributed as dist

    store = dist.TCPStore(
        os.environ['MASTER_ADDR'],
        int(os.environ['MASTER_PORT']),
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    # torchrun's agent store outlives a restart of the workers (--max-restarts): keys of each attempt apart
    return dist.PrefixStore(f'attempt-{os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")}', store)


def _flush() -> None:
    for h in logging.getLogger().handlers + logging.getLogger('skipssl').handlers:
        try:
            h.flush()
        except Exception:  # a handler on a closed stream must not keep the process alive
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


_active: Optional['FailureWatch'] = None


def active_watch() -> Optional['FailureWatch']:
    """The watch this process started for its multi-rank job, if one is running."""
    return _active


class FailureWatch:
    """The per-rank side of a multi-rank job's failure handling; see the module docstring."""

    def __init__(self, rank: int, world_size: int, prog: str) -> None:
        self.rank, self.world_size, self.prog = rank, world_size, prog
        self._stop = threading.Event()
        self._exiting = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._store: Optional['Store'] = None
        self._flushers: List[Callable[[], None]] = []
        self._root = False  # this rank claimed the job's failure

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def start(self) -> 'FailureWatch':
        """Begin polling (call once the process group is up, so the store exists)."""
        global _active
        if not self.active:
            return self
        self._store, poll_store = _store(), _store()
        if self._store is None or poll_store is None:
            # without a store the watch thread would take it for a lost one and end a healthy job
            raise RuntimeError(
                f'a failure watch for {self.world_size} ranks needs the rendezvous store: set WORLD_SIZE, '
                'MASTER_ADDR and MASTER_PORT (env://)'
            )
        _active = self
        self._thread = threading.Thread(
            target=self._poll, args=(poll_store,), name='skipssl-failure-watch', daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling: before the normal tear-down, where rank 0 (the store's host under srun) may leave first."""
        global _active
        self._stop.set()
        if _active is self:
            _active = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            try:  # a rank that has finished is not a frozen one: its watcher stops looking
                if self._store is not None:
                    self._store.set(f'{BEAT_KEY}/{self.rank}', DONE)
            except Exception:
                pass

    def flush_at_exit(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Have ``fn`` (a log's flush) run before this process ends through the watch; returns its removal."""
        self._flushers.append(fn)
        return lambda: self._flushers.remove(fn) if fn in self._flushers else None

    def _run_flushers(self) -> None:
        if not self._flushers:
            return

        def run() -> None:
            for fn in list(self._flushers):
                try:
                    fn()
                except Exception:  # a log that cannot be flushed must not keep the others from it
                    pass

        thread = threading.Thread(target=run, name='skipssl-exit-flush', daemon=True)
        thread.start()
        thread.join(EXIT_FLUSH_S)

    def _poll(self, store: 'Store') -> None:
        unreachable_since = None
        beats, next_beat = 0, 0.0
        peer = (self.rank + 1) % self.world_size
        peer_beat: Optional[bytes] = None
        peer_moved = time.monotonic()
        while not self._stop.wait(POLL_S):
            try:
                found = store.check([FAILED_KEY])
                root = int(store.get(FAILED_KEY)) if found else None
                if root is None and time.monotonic() >= next_beat:
                    beats, next_beat = beats + 1, time.monotonic() + BEAT_S
                    store.set(f'{BEAT_KEY}/{self.rank}', str(beats))
                    key = f'{BEAT_KEY}/{peer}'
                    beat = store.get(key) if store.check([key]) else None
                    if beat != peer_beat or beat == DONE.encode():
                        peer_beat, peer_moved = beat, time.monotonic()
                    elif time.monotonic() - peer_moved > STALL_S:
                        self._stalled(peer, time.monotonic() - peer_moved)
                unreachable_since = None
            except Exception as exn:  # the store's host (rank 0 or the launcher) may be gone
                unreachable_since = unreachable_since or time.monotonic()
                # a passing network hiccup must not end a healthy job: only a store that stays away does
                if self._stop.is_set() or time.monotonic() - unreachable_since < STORE_LOST_S:
                    continue
                self._exit(
                    1,
                    f"rank {self.rank}: stopping because the job's rendezvous store has been unreachable "
                    f'for {STORE_LOST_S:.0f} s (rank 0 or the launcher ended?): {first_line(exn)}',
                )
            if root == self.rank and not self._root:  # woken (SIGCONT) after the others ended the job for its silence
                self._exit(1, f'rank {self.rank}: stopping: the other ranks ended the job while this one was silent')
            if root is not None and root != self.rank:
                self._ack(store)
                self._exit(1, f'rank {self.rank}: stopping because rank {root} failed', follower=True)

    def _stalled(self, peer: int, silent_s: float) -> None:
        """End the job for ``peer``, silent for ``silent_s``; nothing when another rank has claimed a failure first
        (its record then ends this one)."""
        if not self._claim():
            return
        text = (
            f'{self.prog}: rank {peer} has shown no sign of life for {silent_s:.0f} s (its failure watch stopped '
            f'beating: stopped with SIGSTOP, frozen, or its host unreachable?); ending the job'
        )
        _record_for_torchrun(text)
        self._exit(1, f'rank {self.rank}: {text}', root=True, failed=peer)

    # -- the error path ------------------------------------------------------------------------------------
    def fail(self, exn: BaseException, describe: Callable[[BaseException], Tuple[int, Optional[str]]]) -> NoReturn:
        """End this process for ``exn``. ``describe(exn)`` gives (exit status, one-line message), or a None message
        for an internal error, printed with its traceback."""
        if lost_peer(exn):
            root = self._wait_for_root()
            if root is not None:
                self._ack(self._store)
                self._exit(1, f'rank {self.rank}: stopping because rank {root} failed', follower=True)
            self._exit(
                1,
                f'rank {self.rank}: stopping: lost contact with another rank, which ended without reporting '
                f'an error (killed, out of memory, crashed?): {first_line(exn)}',
            )
        status, line = describe(exn)
        text = f'{self.prog}: {line}' if line else ''.join(traceback.format_exception(exn)).rstrip()
        if self._claim():
            _record_for_torchrun(text)
            self._exit(status, f'rank {self.rank}: {text}', root=True)
        root = self._wait_for_root()
        self._ack(self._store)
        self._exit(
            status,
            f'rank {self.rank}: stopping because rank {root if root is not None else "?"} failed '
            f'first (here too: {first_line(exn) if line is None else line})',
            follower=True,
        )

    def _claim(self) -> bool:
        if self._store is None:  # not started
            return True
        try:
            self._root = self._store.add(CLAIM_KEY, 1) == 1
        except Exception:  # no store (its host died first): this rank's error is all it knows
            self._root = True
        return self._root

    def _wait_for_root(self) -> Optional[int]:
        if self._store is None:  # not started
            return None
        deadline = time.monotonic() + ROOT_WAIT_S
        while time.monotonic() < deadline:
            try:
                if self._store.check([FAILED_KEY]):
                    return int(self._store.get(FAILED_KEY))
            except Exception:
                return None
            time.sleep(POLL_S / 2)
        return None

    def _ack(self, store: Optional['Store']) -> None:
        if store is None:  # not started
            return
        try:
            store.add(ACK_KEY, 1)
        except Exception:
            pass

    def _exit(
        self, status: int, message: str, root: bool = False, follower: bool = False, failed: Optional[int] = None
    ) -> NoReturn:
        """``failed``: the rank the root's record names (itself unless another rank stalled)."""
        with self._exiting:  # the watch thread and the main thread must not both print
            _flush()
            print(message, file=sys.stderr, flush=True)
            self._run_flushers()
            if root:
                try:
                    if self._store is not None:
                        self._store.set(FAILED_KEY, str(self.rank if failed is None else failed))
                        # let the peers print their line before this process (perhaps the store's host) ends
                        deadline = time.monotonic() + ACK_WAIT_S
                        while time.monotonic() < deadline and self._store.add(ACK_KEY, 0) < self.world_size - 1:
                            time.sleep(POLL_S / 2)
                except Exception:
                    pass
            elif follower:
                # the root ends first, so that torchrun's summary names it as the first failure
                time.sleep(FOLLOWER_DELAY_S)
            _flush()
            os._exit(status)


def _record_for_torchrun(text: str) -> None:
    """The root error in torchrun's error file (TORCHELASTIC_ERROR_FILE, its ErrorHandler's format), which its
    failure summary shows as the root cause's 'traceback'."""
    path = os.environ.get('TORCHELASTIC_ERROR_FILE')
    if not path:
        return
    record = {
        'message': {
            'message': text.splitlines()[-1],
            'extraInfo': {'py_callstack': text, 'timestamp': str(int(time.time()))},
        }
    }
    try:
        with open(path, 'w') as f:
            json.dump(record, f)
    except OSError:  # a summary without the message is no reason to fail differently
        pass

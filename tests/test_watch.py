"""The ranks' stop agreement and the failure watch, really run (torchrun with 2 gloo processes, or 2 plain
processes with env:// variables as srun starts them): the stop vote issues no blocking host collective in an
ordinary iteration and still stops every rank at the same iteration with a checkpoint; a rank ended by the
watch flushes its logs first; a SIGSTOPped rank is named and the job ended."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from skipssl import checkpoint as ckpt

from .image_shards import write_pattern_shards
from .test_failures import WATCH_FAIL, WATCH_START, two_plain_ranks
from .test_train import ROOT, _descendants, _env, _wait_for, command, log_lines

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    return write_pattern_shards(tmp_path_factory.mktemp('shards'), n=512, n_shards=2)


# -- the stop vote ---------------------------------------------------------------------------------------------
# Counts, per iteration boundary, the collectives issued from skipssl/train/distributed.py (the trainer's host
# collectives: all_reduce_cpu, StopVote, rank0_decides; on a GPU run they cross the gloo control group, a host
# round trip each) by wrapping torch.distributed's functions; rank 1 sends itself SIGTERM after iteration STOP.
STOP = 4
VOTE_PROBE = """
import json, os, signal, sys, traceback
import torch.distributed as dist
from skipssl.train import main
from skipssl.train import trainer as trainer_module

HOST = os.path.join('skipssl', 'train', 'distributed.py')
calls, boundary, depth = [], [0], [0]


def counted(name):
    real = getattr(dist, name)

    def call(*args, **kwargs):
        if depth[0] == 0 and any(f.filename.endswith(HOST) for f in traceback.extract_stack()[:-1]):
            calls.append({'boundary': boundary[0], 'op': name, 'async': bool(kwargs.get('async_op'))})
        depth[0] += 1
        try:
            return real(*args, **kwargs)
        finally:
            depth[0] -= 1

    setattr(dist, name, call)


for name in ('all_reduce', 'broadcast', 'broadcast_object_list', 'all_gather', 'all_gather_object', 'barrier',
             'reduce', 'gather', 'scatter', 'all_to_all', 'reduce_scatter'):
    counted(name)
real_iteration = trainer_module.Trainer.iteration


def iteration(self, batches):
    wait = real_iteration(self, batches)
    boundary[0] = self.pos.iteration
    if self.pos.iteration == %(stop)d and self.info.rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return wait


trainer_module.Trainer.iteration = iteration
status = main(sys.argv[1:])
with open(os.path.join(%(out)r, f'calls-{os.environ["RANK"]}.json'), 'w') as f:
    json.dump(calls, f)
sys.exit(status)
"""


@pytest.mark.slow
def test_stop_vote_blocks_no_iteration_and_stops_every_rank_at_the_same_iteration(shards, tmp_path):
    """2 ranks, 10 iterations per epoch, no logging or checkpoint before the end: each ordinary iteration
    boundary starts one asynchronous host all-reduce (the vote) and waits for none; a SIGTERM that rank 1 alone
    receives after iteration 4 stops both ranks after iteration 5, with one checkpoint there, exit 0. (It used
    to be one blocking gloo all-reduce per iteration.)"""
    probe = tmp_path / 'probe.py'
    probe.write_text(VOTE_PROBE % {'stop': STOP, 'out': str(tmp_path)})
    out = tmp_path / 'run'
    overrides = ['data.samples_per_epoch=640', 'train.epochs=1', 'train.log_every=100', 'train.checkpoint_every=100']
    cmd = command(out, shards, *overrides, nproc=2)
    cmd[cmd.index('pretrain.py')] = str(probe)
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**_env(), 'PYTHONPATH': str(ROOT)}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    for rank in (0, 1):
        calls = json.loads((tmp_path / f'calls-{rank}.json').read_text())
        for b in range(1, STOP + 1):  # ordinary boundaries: no log, checkpoint or epoch end
            at = [c for c in calls if c['boundary'] == b]
            assert [c['async'] for c in at] == [True], (rank, b, at)
        # the vote read at STOP + 1 says stop: no new vote, the checkpoint's blocking collectives
        assert not [c for c in calls if c['boundary'] == STOP + 1 and c['async']], calls
    assert 'SIGTERM received: checkpoint written at iteration 5' in proc.stderr, proc.stderr[-3000:]
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['stopped_by'] == 'SIGTERM' and summary['iterations'] == STOP + 1
    assert [i for i, _ in ckpt.list_checkpoints(out / 'checkpoints')] == [STOP + 1]


# -- logs flushed before the watch ends a process ---------------------------------------------------------------
FLUSH_PROBE = (
    WATCH_START
    + """
from pathlib import Path
from skipssl.train.logger import RunLogger
run_dir = Path(sys.argv[2]) / f'rank{rank}'
run_dir.mkdir()
logger = RunLogger(run_dir, True)
for it in (1, 2, 3):
    logger.scalars(it, {'train/loss': 1.0 / it})
watch.flush_at_exit(lambda: (run_dir / 'flushed').touch())
if rank == 0:  # a file system that hangs: the exit waits for it a bounded time only
    watch.flush_at_exit(lambda: time.sleep(600))
dist.barrier()
"""
    + WATCH_FAIL
)


@pytest.mark.parametrize('failing', [0, 1])
def test_a_rank_the_watch_ends_flushes_tensorboard_and_log_jsonl_first(tmp_path, failing):
    """Both ranks log 3 scalars, then one fails: the failing rank and the one its watch ends both leave with
    os._exit, after the flushes registered with the watch (the RunLogger's: TensorBoard's writer thread and
    log.jsonl; a marker), and both runs' files hold the 3 scalars. Rank 0 also registered a flush that hangs: it
    still ends within seconds. (On a local disk without TensorFlow, tensorboard writes each event through as
    its writer thread takes it, so before the flush only the events still queued were lost; with TensorFlow's
    gfile or a file system without append they wait for a flush every 2 minutes.)"""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    procs = two_plain_ranks(FLUSH_PROBE, str(failing), str(tmp_path))
    start = time.monotonic()
    errs = [p.communicate(timeout=180)[1] for p in procs]
    assert time.monotonic() - start < 120, errs  # the hanging flush would hold it for 600 s
    assert procs[failing].returncode == 2 and procs[1 - failing].returncode == 1, errs
    for rank in (0, 1):
        run_dir = tmp_path / f'rank{rank}'
        acc = EventAccumulator(str(run_dir / 'tb'))
        acc.Reload()
        assert [e.step for e in acc.Scalars('train/loss')] == [1, 2, 3], (rank, errs[rank])
        assert sorted(log_lines(run_dir)) == [1, 2, 3]
        assert (run_dir / 'flushed').exists(), errs[rank]


# -- a frozen rank --------------------------------------------------------------------------------------------
STALL_S = 10


def _rank_pid(agent: int, rank: int) -> int:
    for pid in _descendants(agent):
        try:
            env = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
        except OSError:
            continue
        if f'RANK={rank}'.encode() in env and b'LOCAL_RANK=' + str(rank).encode() in env:
            return pid
    raise AssertionError(f'no process of rank {rank} under {agent}')


@pytest.mark.slow
def test_a_sigstopped_rank_is_named_and_the_job_ended(shards, tmp_path):
    """Rank 1 of a 2-rank torchrun run is SIGSTOPped mid-epoch: rank 0 waits in a collective (gloo's time-out
    is 30 minutes) while its watch sees rank 1's beat stop; after the watch's stall time-out (10 s here) it says
    so in one line and ends, and torchrun ends the stopped rank. (It used to wait without a word.)"""
    out = tmp_path / 'run'
    cmd = command(out, shards, 'data.samples_per_epoch=4096', 'train.epochs=1', 'train.log_every=1', nproc=2)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**_env(), 'SKIPSSL_STALL_S': str(STALL_S)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stopped = None
    try:
        _wait_for(lambda: (out / 'log.jsonl').exists() and max(log_lines(out), default=0) >= 2, proc, 240, 'it 2')
        stopped = _rank_pid(proc.pid, 1)
        os.kill(stopped, signal.SIGSTOP)
        start = time.monotonic()
        _, stderr = proc.communicate(timeout=120)
        elapsed = time.monotonic() - start
    finally:
        if stopped is not None:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(stopped, sig)
                except ProcessLookupError:
                    pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert STALL_S - 2 < elapsed < STALL_S + 75, elapsed
    lines = [ln for ln in stderr.splitlines() if 'has shown no sign of life' in ln]
    assert lines and lines[0].startswith('rank 0: pretrain.py: rank 1 has shown no sign of life for '), stderr[-3000:]
    ranks_output = stderr[: stderr.index('torch/distributed/elastic/multiprocessing/api.py')]
    assert 'Traceback' not in ranks_output and ranks_output.count('has shown no sign of life') == 1, ranks_output

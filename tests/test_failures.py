"""Failure handling of pretraining, really run: a failure on one of 2 torchrun ranks ends the job in seconds
with its error printed once; resumes that are refused change nothing; checkpoints that exist but do not verify
stop the run; the run folder's lock; pipe: shard specs need an opt-in; impossible config values and user errors
are one line and exit status 2."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from skipssl import checkpoint as ckpt
from skipssl.config import ConfigError, load_config
from skipssl.data import resolve_shards
from skipssl.runlock import RunFolderError, RunLock, check_free
from skipssl.train import state as train_state
from skipssl.train.distributed import DistInfo
from skipssl.train.engine import precision_unsupported
from skipssl_common.distributed import free_port

from .image_shards import write_pattern_shards
from .precision import needs, needs_no
from .test_train import ROOT, TINY, _env, command, final_weights, log_lines, run

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')
ONE_RANK = DistInfo(0, 1, 0, torch.device('cpu'), 'single')


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    return write_pattern_shards(tmp_path_factory.mktemp('shards'), n=512, n_shards=2)


@pytest.fixture(scope='module')
def short_run(shards, tmp_path_factory):
    """One process, 2 iterations (checkpoints at 1 and 2)."""
    out = tmp_path_factory.mktemp('short') / 'run'
    run(out, shards, 'data.samples_per_epoch=64', 'train.epochs=1', 'train.checkpoint_every=1')
    return out


def _ranks_output(stderr: str) -> str:
    """What the ranks wrote, before torchrun's agent reports the failure (its summary repeats the root error)."""
    return stderr[: stderr.index('torch/distributed/elastic/multiprocessing/api.py')]


def _one_error_line(stderr: str, prefix: str = 'pretrain.py: ') -> str:
    assert 'Traceback' not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _garble(shard: Path) -> None:
    """Random bytes of the shard's own size: it passes the start-up size check against its index (pretraining
    does not hash shards) and fails when read."""
    shard.write_bytes(os.urandom(shard.stat().st_size))


# -- one rank fails -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_unreadable_data_on_rank_1_only_ends_the_torchrun_job_within_seconds(shards, tmp_path):
    """Rank 1's shard is not a tar (rank 0's is fine): rank 1 stops at its first batch while rank 0 waits in
    the first gradient all-reduce. Before, both waited for the 10-minute collective time-out."""
    data = tmp_path / 'data'
    shutil.copytree(shards, data)
    _garble(data / 'train-000001.tar')
    start = time.monotonic()
    # in a data-loader worker, which hands the error to the trainer wrapped in the worker's traceback
    proc = run(
        tmp_path / 'run', data, 'data.samples_per_epoch=256', 'data.num_workers=1', nproc=2, timeout=240, check=False
    )
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert elapsed < 90, elapsed
    err = _ranks_output(proc.stderr)
    assert err.count('no readable samples in shards') == 1 and 'Traceback' not in err, err[-5000:]
    root = err.index('rank 1: pretrain.py: no readable samples in shards')
    assert 'train-000001.tar' in err[root:].splitlines()[0]
    assert 'rank 0: stopping because rank 1 failed' in err[root:]
    # torchrun's summary names rank 1 as the root cause, with its message
    summary = proc.stderr[proc.stderr.index('Root Cause') :]
    assert 'rank      : 1' in summary and 'no readable samples' in summary, summary
    assert not list((tmp_path / 'run' / 'checkpoints').glob('ckpt-*'))


@pytest.mark.slow
def test_resume_refused_by_rank_0_ends_the_job_at_once_and_leaves_the_config(short_run, shards, tmp_path):
    """A 1-rank run (one virtual data slot) resumed with 2 ranks, which cannot share its stream: rank 0 refuses,
    rank 1 follows (it used to wait 613 s); config.yaml stays the one the run was started with."""
    out = tmp_path / 'run'
    shutil.copytree(short_run, out)
    before = (out / 'config.yaml').read_text()
    start = time.monotonic()
    proc = run(out, shards, 'data.samples_per_epoch=64', 'train.epochs=2', nproc=2, timeout=240, check=False)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0 and elapsed < 90, (elapsed, proc.stderr[-3000:])
    err = _ranks_output(proc.stderr)
    assert err.count('which 2 ranks cannot share equally: it resumes on [1] ranks') == 1, proc.stderr[-3000:]
    assert 'rank 0: pretrain.py: ' in err and 'rank 1: stopping because rank 0 failed' in err and 'Traceback' not in err
    assert (out / 'config.yaml').read_text() == before and not list(out.glob('config-*.yaml'))


# -- checkpoints ----------------------------------------------------------------------------------------------
def _corrupt_all(run_dir: Path) -> list:
    names = []
    for _, folder in ckpt.list_checkpoints(run_dir / 'checkpoints'):
        f = folder / ckpt.MODEL_FILE
        f.write_bytes(f.read_bytes()[:100])
        names.append(folder.name)
    return names


def test_checkpoints_that_all_fail_verification_stop_the_run_unless_a_restart_is_asked_for(short_run, shards, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(short_run, out)
    names = _corrupt_all(out)
    assert names == ['ckpt-00000001', 'ckpt-00000002']
    with pytest.raises(ckpt.CheckpointError, match='none verifies'):
        train_state.find_resumable(out / 'checkpoints', ONE_RANK)
    proc = run(out, shards, 'data.samples_per_epoch=64', 'train.epochs=1', check=False)
    line = _one_error_line(proc.stderr)
    assert proc.returncode == 2 and all(n in line for n in names) and 'restart_if_no_valid_checkpoint' in line
    assert [n for _, n in ckpt.list_checkpoints(out / 'checkpoints')] and names == _corrupt_all(out)
    # the explicit flag starts again and moves the unusable ones aside (so they can never shadow new ones)
    assert train_state.find_resumable(out / 'checkpoints', ONE_RANK, restart_if_none_valid=True) is None
    assert ckpt.list_checkpoints(out / 'checkpoints') == []
    (aside,) = (out / 'checkpoints').glob('unusable-*')
    assert sorted(p.name for p in aside.iterdir()) == names


def test_resume_of_another_model_is_one_line_exit_2_and_changes_nothing(short_run, shards, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(short_run, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob('*')}
    proc = run(
        out, shards, 'data.samples_per_epoch=64', 'model.kwargs.depth=3', 'model.kwargs.skip_indices=[1]', check=False
    )
    line = _one_error_line(proc.stderr)
    assert proc.returncode == 2 and 'the config asks for' in line and 'use a new experiment.output_dir' in line
    after = {p.name: p.stat().st_mtime_ns for p in out.rglob('*') if p.name != '.writer.lock'}
    assert after == {k: v for k, v in before.items() if k != '.writer.lock'}


@pytest.mark.slow
def test_resume_with_fewer_loader_workers_continues_the_same_run(shards, tmp_path):
    """Loader workers read virtual slots whose batches and augmentations do not depend on the workers: a run
    started with 2 workers and resumed with 1 equals, bit for bit, the one that kept 2 (it used to be refused)."""
    ref, out = tmp_path / 'ref', tmp_path / 'run'
    run(ref, shards, 'data.samples_per_epoch=128', 'data.num_workers=2')
    run(out, shards, 'data.samples_per_epoch=128', 'data.num_workers=2', 'train.stop_after_iterations=2')
    run(out, shards, 'data.samples_per_epoch=128', 'data.num_workers=1')
    a, b = log_lines(ref), log_lines(out)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[i]['train/loss'] == b[i]['train/loss'] for i in a), (a, b)
    wa, wb = final_weights(ref), final_weights(out)
    for part in ('student', 'teacher'):
        assert all(torch.equal(wa[part][k], wb[part][k]) for k in wa[part]), part


# -- the run folder --------------------------------------------------------------------------------------------
def test_a_second_writer_is_refused_and_the_lock_dies_with_its_holder(shards, tmp_path):
    out = tmp_path / 'run'
    lock = RunLock(out).acquire()
    try:
        proc = run(out, shards, 'data.samples_per_epoch=64', check=False)
        line = _one_error_line(proc.stderr)
        assert proc.returncode == 2 and 'in use by another run' in line and f'pid {os.getpid()}' in line
        with pytest.raises(RunFolderError, match='in use'):
            check_free(out)  # what skipssl_launch.submit checks before submitting
    finally:
        lock.release()
    check_free(out)
    # a holder killed with SIGKILL leaves the lock free: the kernel drops a dead process's flock
    holder = subprocess.Popen(
        [
            sys.executable,
            '-c',
            'import sys, time; from skipssl.runlock import RunLock; '
            f'RunLock({str(out)!r}).acquire(); print("held", flush=True); time.sleep(60)',
        ],
        cwd=ROOT,
        env={**_env(), 'PYTHONPATH': str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == 'held'
        with pytest.raises(RunFolderError, match=f'pid {holder.pid} '):
            check_free(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    check_free(out)


def test_read_only_run_folder_is_one_line_exit_2(short_run, shards, tmp_path):
    if shutil.which('unshare') is None:
        pytest.skip('needs unshare (util-linux) for a read-only bind mount')
    out = tmp_path / 'run'
    shutil.copytree(short_run, out)
    cmd = ' '.join(f"'{c}'" for c in command(out, shards, 'data.samples_per_epoch=64'))
    mount = f'mount --bind {out} {out} && mount -o remount,bind,ro {out}'
    probe = subprocess.run(['unshare', '--mount', '--propagation', 'private', 'sh', '-c', mount], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f'cannot make a read-only bind mount here: {probe.stderr.decode()[-200:]}')
    proc = subprocess.run(
        ['unshare', '--mount', '--propagation', 'private', 'sh', '-c', f'{mount} && exec {cmd}'],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = _one_error_line(proc.stderr)
    assert proc.returncode == 2 and 'experiment.output_dir: cannot write to' in line and str(out) in line


# -- pipe: shards ----------------------------------------------------------------------------------------------
def test_pipe_shard_specs_need_an_opt_in(shards, tmp_path):
    marker = tmp_path / 'ran'
    spec = f'pipe:touch {marker} && cat {shards}/train-000000.tar'
    listing = tmp_path / 'list.txt'
    listing.write_text(f'{shards}/train-000001.tar\n{spec}\n')
    for s in (spec, str(listing)):
        with pytest.raises(ValueError, match=r'is a shell command \(pipe:\), refused without an explicit opt-in'):
            resolve_shards(s)
    assert resolve_shards(str(listing), allow_pipe=True)[1] == spec
    proc = run(tmp_path / 'run', listing, 'data.samples_per_epoch=64', check=False)
    line = _one_error_line(proc.stderr)
    assert proc.returncode == 2 and 'data.train_shards' in line and spec in line and 'allow_pipe_shards' in line
    knn = subprocess.run(
        [
            sys.executable,
            'knn_eval.py',
            '--checkpoint',
            'pixels',
            '--out-dir',
            str(tmp_path / 'e'),
            '--train-shards',
            spec,
            '--test-shards',
            str(shards),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = _one_error_line(knn.stderr, 'knn_eval.py: ')
    assert knn.returncode == 2 and '--allow-pipe-shards' in line
    assert not marker.exists()


# -- impossible values and user errors -------------------------------------------------------------------------
@pytest.mark.parametrize(
    'override, key',
    [
        ('head.bottleneck_dim=0', 'head.bottleneck_dim'),
        ('model.kwargs.skip_indices="13"', 'model.kwargs.skip_indices'),
        ('model.kwargs.skip_indices=[1, 1]', 'model.kwargs.skip_indices'),
        ('train.stop_after_iterations=-1', 'train.stop_after_iterations'),
        ('data.shuffle_buffer=-5', 'data.shuffle_buffer'),
        ('data.max_skip_fraction=-0.1', 'data.max_skip_fraction'),
        ('data.samples_per_epoch=-1', 'data.samples_per_epoch'),
    ],
)
def test_impossible_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf'^{key}: '):
        load_config(TINY, [override])


@pytest.mark.parametrize(
    'override, expect',
    [
        ('model.kwargs.embed_dim=33', 'model: vit_tiny_patch16_skipat_224 cannot be built'),
        # timm would take it, but the evaluators rebuild exports from the architecture arguments only
        ('model.kwargs.act_layer=gelu_tanh', "model.kwargs: model kwarg 'act_layer' is refused"),
        ('data.samples_per_epoch=16', 'data.samples_per_epoch: an epoch of 16 samples is less than one global batch'),
    ],
)
def test_user_errors_before_the_process_group_are_one_line_exit_2(shards, tmp_path, override, expect):
    proc = run(tmp_path / 'run', shards, override, check=False)
    line = _one_error_line(proc.stderr)
    assert proc.returncode == 2 and expect in line, line
    assert not (tmp_path / 'run').exists()


@needs_no('fp16')
def test_fp16_on_a_machine_whose_deepspeed_refuses_it_is_one_line_before_the_process_group(shards, tmp_path):
    """On a CPU whose oneDNN has no fp16 (AMD EPYC, some Xeons) DeepSpeed's engine raises 'Type fp16 is not
    supported on your device' once every rank is up; pretrain.py refuses first, with DeepSpeed's own check."""
    proc = run(tmp_path / 'run', shards, 'engine.precision=fp16', 'engine.zero_stage=1', check=False)
    line = _one_error_line(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert line == f'pretrain.py: config error: engine.precision: {precision_unsupported("fp16")}; use bf16 or fp32'
    assert not (tmp_path / 'run').exists()


@needs('fp16')
def test_fp16_trains_on_a_machine_whose_deepspeed_accepts_it(shards, tmp_path):
    """The other side of the refusal: where DeepSpeed has fp16 (a GPU, a CPU whose oneDNN has fp16 kernels),
    pretrain.py runs it (ZeRO 1, dynamic loss scaling)."""
    proc = run(tmp_path / 'run', shards, 'engine.precision=fp16', 'engine.zero_stage=1', 'data.samples_per_epoch=64')
    assert 'state: finished' in proc.stdout


def test_the_only_shard_unreadable_is_one_line_exit_2(tmp_path):
    data = tmp_path / 'data'
    data.mkdir()
    (data / 'only.tar').write_bytes(os.urandom(5000))
    proc = run(tmp_path / 'run', data, 'data.samples_per_epoch=64', check=False)
    line = _one_error_line(proc.stderr)
    assert proc.returncode == 2 and 'readable sample' in line and 'only.tar' in line


@pytest.mark.slow
def test_launch_submit_refuses_user_errors_in_one_line(shards, tmp_path):
    base = [
        sys.executable,
        '-m',
        'skipssl_launch.submit',
        'pretrain',
        '--cluster',
        'debug',
        '--config',
        TINY,
        f'data.train_shards={shards}',
        f'experiment.output_dir={tmp_path / "run"}',
    ]
    for extra, expect in (
        (['model.kwargs.embed_dim=33'], 'cannot be built'),
        (['head.bottleneck_dim=0'], 'head.bottleneck_dim'),
    ):
        proc = subprocess.run(base + extra, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
        line = _one_error_line(proc.stderr, 'skipssl-submit pretrain: ')
        assert proc.returncode == 2 and expect in line and 'nothing submitted' in line
    lock = RunLock(tmp_path / 'run').acquire()
    try:
        proc = subprocess.run(base, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    finally:
        lock.release()
    line = _one_error_line(proc.stderr, 'skipssl-submit pretrain: ')
    assert proc.returncode == 2 and 'in use by another run' in line


def test_launch_submit_refuses_a_resume_the_job_would_refuse(short_run, shards, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(short_run, out)
    base = [
        sys.executable,
        '-m',
        'skipssl_launch.submit',
        'pretrain',
        '--cluster',
        'debug',
        '--config',
        TINY,
        f'data.train_shards={shards}',
        f'experiment.output_dir={out}',
        'data.samples_per_epoch=64',
    ]
    for extra, expect in (
        (['model.kwargs.depth=3', 'model.kwargs.skip_indices=[1]'], 'the config asks for'),
        (['--cluster', 'local', '--tasks-per-node', '2'], 'which 2 ranks cannot share equally'),
    ):
        proc = subprocess.run(base + extra, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
        line = _one_error_line(proc.stderr, 'skipssl-submit pretrain: ')
        assert proc.returncode == 2 and expect in line and 'nothing submitted' in line
    assert not (out / 'submitit').exists()


# -- evaluators under torchrun -----------------------------------------------------------------------------------
def test_an_evaluator_rank_that_fails_ends_the_torchrun_job_within_seconds(shards, tmp_path):
    """knn_eval.py with 2 ranks: rank 1's shard has samples without labels, so rank 1 stops in its extraction
    while rank 0 waits to gather the features."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    data = tmp_path / 'data'
    shutil.copytree(shards, data)
    with wds.TarWriter(str(data / 'train-000001.tar')) as w:
        for i in range(256):
            buf = io.BytesIO()
            Image.fromarray(np.full((28, 28), i, dtype=np.uint8)).save(buf, format='PNG')
            w.write({'__key__': f'nolabel{i:05d}', 'png': buf.getvalue()})
    test = write_pattern_shards(tmp_path / 'test', n=64, n_shards=1, seed=1)  # held out: not a copy of train
    cmd = [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--nproc_per_node',
        '2',
        '--master_addr',
        '127.0.0.1',
        '--master_port',
        str(free_port()),
        'knn_eval.py',
        '--checkpoint',
        'pixels',
        '--out-dir',
        str(tmp_path / 'e'),
        '--train-shards',
        str(data),
        '--test-shards',
        str(test),
        '--channels',
        '1',
        '--resize',
        '28',
        '--crop',
        '28',
        '--num-workers',
        '0',
        '--k',
        '1',
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0 and elapsed < 90, (elapsed, proc.stderr[-3000:])
    err = _ranks_output(proc.stderr)
    assert err.count('has no label') == 1 and 'Traceback' not in err, err[-3000:]
    root = err.index('rank 1: knn_eval.py: error: ')
    assert 'rank 0: stopping because rank 1 failed' in err[root:]


@pytest.mark.slow
def test_a_failing_task_of_a_local_submitit_job_ends_the_job_and_is_reported(shards, tmp_path):
    """The same one-rank failure through ``skipssl_launch.submit --cluster local`` (2 tasks, srun-like environment): the
    job ends in seconds (submitit then waits up to 15 s for results) and the client names rank 1's error, not
    rank 0's note that it stopped because of it."""
    data = tmp_path / 'data'
    shutil.copytree(shards, data)
    _garble(data / 'train-000001.tar')
    cmd = [
        sys.executable,
        '-m',
        'skipssl_launch.submit',
        'pretrain',
        '--cluster',
        'local',
        '--tasks-per-node',
        '2',
        '--config',
        TINY,
        f'data.train_shards={data}',
        f'experiment.output_dir={tmp_path / "run"}',
        'data.samples_per_epoch=256',
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1 and elapsed < 90, (elapsed, proc.stderr[-3000:])
    line = _one_error_line(proc.stderr, 'skipssl-submit pretrain: ')
    assert 'failed: rank 1: pretrain.py: no readable samples in shards' in line and 'train-000001.tar' in line


def test_a_failure_watch_without_the_rendezvous_store_refuses_to_start(monkeypatch):
    """A multi-rank watch with no env:// store (no MASTER_ADDR) would start a polling thread that takes the
    missing store for a lost one and ends the healthy process after STORE_LOST_S; start() says why instead."""
    from skipssl.failure import FailureWatch, active_watch

    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.delenv('MASTER_ADDR', raising=False)
    watch = FailureWatch(0, 2, 'probe')
    with pytest.raises(RuntimeError, match='needs the rendezvous store'):
        watch.start()
    assert active_watch() is None and watch._thread is None


WATCH_START = """
import sys, time
import torch.distributed as dist
from skipssl.failure import FailureWatch
dist.init_process_group('gloo')
rank = dist.get_rank()
watch = FailureWatch(rank, 2, 'probe').start()
"""
WATCH_FAIL = """
if rank == int(sys.argv[1]):
    try:
        raise ValueError(f'bad input on rank {rank}')
    except ValueError as exn:
        watch.fail(exn, lambda e: (2, str(e)))
time.sleep(120)   # in no collective: only the watch can end this rank
"""
WATCH_PROBE = WATCH_START + WATCH_FAIL


def two_plain_ranks(script: str, *args: str) -> list:
    """``python -c script *args`` as ranks 0 and 1 of a job with env:// variables (as srun starts them, no agent
    to kill the rest; rank 0 hosts the store); their stderr piped."""
    port = str(free_port())
    return [
        subprocess.Popen(
            [sys.executable, '-c', script, *args],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **_env(),
                'PYTHONPATH': str(ROOT),
                'RANK': str(r),
                'WORLD_SIZE': '2',
                'MASTER_ADDR': '127.0.0.1',
                'MASTER_PORT': port,
            },
        )
        for r in (0, 1)
    ]


@pytest.mark.parametrize('failing', [0, 1])
def test_the_failure_watch_ends_a_rank_that_waits_in_no_collective(tmp_path, failing):
    """Two plain processes with env:// variables: the rank that is not failing sleeps outside any collective,
    as one stuck in an NCCL kernel or a long step would, and still ends within seconds."""
    procs = two_plain_ranks(WATCH_PROBE, str(failing))
    start = time.monotonic()
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert time.monotonic() - start < 30
    other = 1 - failing
    assert procs[failing].returncode == 2 and f'rank {failing}: probe: bad input on rank {failing}' in errs[failing]
    assert procs[other].returncode == 1
    assert errs[other].strip() == f'rank {other}: stopping because rank {failing} failed'


@pytest.mark.slurm
def test_a_failing_task_of_a_slurm_job_ends_the_job_within_seconds(slurm_cluster, shards, tmp_path):
    """The same one-rank failure as a 2-task SLURM job (srun, env:// rendezvous hosted by rank 0)."""
    from .test_launch_helpers import CPU2, in_queue, job_logs, submit_cli, submitted, wait_until

    data = tmp_path / 'data'
    shutil.copytree(shards, data)
    _garble(data / 'train-000001.tar')
    out = tmp_path / 'run'
    start = time.monotonic()
    proc = submit_cli(
        'pretrain',
        '--config',
        TINY,
        *CPU2,
        '--time',
        '10',
        f'data.train_shards={data}',
        f'experiment.output_dir={out}',
        'data.samples_per_epoch=256',
        'engine.device=cpu',
    )
    job_id, folder = submitted(proc)
    wait_until(lambda: not in_queue(job_id), 90, f'job {job_id} leaving the queue', lambda: job_logs(folder, job_id))
    elapsed = time.monotonic() - start
    assert elapsed < 90, elapsed
    errs = [(folder / f'{job_id}_{t}_log.err').read_text() for t in (0, 1)]
    assert errs[1].count('rank 1: pretrain.py: no readable samples in shards') == 1, errs[1][-3000:]
    assert 'no readable samples' not in errs[0] and 'Traceback' not in errs[0] + errs[1]
    assert 'rank 0: stopping because rank 1 failed' in errs[0]

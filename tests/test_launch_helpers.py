"""Shared helpers of the launch tests (no tests here): run `skipssl-submit`, read what it printed,
wait for jobs (bounded), read their results and logs."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from skipssl import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / 'configs' / 'cpu_tiny_skipat.yaml')
FMNIST = Path('/usr/share/datasets/fashion-mnist')
# 2 CPU ranks x 32 images = 64 per iteration; 768 samples per epoch = 12 iterations per epoch
SMALL = ['data.samples_per_epoch=768', 'train.epochs=2', 'train.log_every=1', 'engine.device=cpu']
CPU2 = ['--gpus-per-node', '0', '--tasks-per-node', '2', '--cpus-per-task', '1']


def make_pretrain_shards(out: Path) -> Path:
    """Fashion-MNIST's test split (Debian package dataset-fashion-mnist) as shards, else synthetic gratings."""
    if (FMNIST / 't10k-images-idx3-ubyte.gz').exists():
        from skipssl.data.make_shards import write_shards
        from skipssl.data.sources import open_source

        write_shards(
            open_source('fashion-mnist', FMNIST, 'test'), out, 'train', max_samples=2500, workers=1, progress=False
        )
        return out
    from .image_shards import write_pattern_shards

    return write_pattern_shards(out, n=1024, n_shards=4)


def client_env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            (
                'SLURM_JOB',
                'SLURM_STEP',
                'SLURM_PROCID',
                'SLURM_NTASKS',
                'SUBMITIT_',
                'RANK',
                'WORLD_SIZE',
                'LOCAL_RANK',
                'MASTER_',
                'TORCHELASTIC',
            )
        )
    }
    env.update(PYTHONUNBUFFERED='1', **extra)
    return env


def submit_cli(*args, timeout=180, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'skipssl_launch.submit', *map(str, args)],
        cwd=ROOT,
        env=env or client_env(OMP_NUM_THREADS='1'),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def submitted(proc: subprocess.CompletedProcess, kind: str = 'pretrain'):
    """(job id, log folder) of the job of `kind` the CLI printed."""
    assert proc.returncode == 0, (
        f'skipssl_launch.submit failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}'
    )
    m = re.search(rf'^{kind} job (\S+) submitted .*\n\s+logs: (\S+)', proc.stdout, re.M)
    assert m, proc.stdout
    return m.group(1), Path(m.group(2))


def scontrol_job(job_id: str) -> dict:
    out = subprocess.run(
        ['scontrol', 'show', 'job', '-o', job_id], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    return dict(item.split('=', 1) for item in out.split() if '=' in item)


def job_logs(folder: Path, job_id: str, lines: int = 25) -> str:
    parts = []
    for path in sorted(Path(folder).glob(f'{job_id}_*_log.*')):
        parts.append(f'--- {path.name}\n' + '\n'.join(path.read_text(errors='replace').splitlines()[-lines:]))
    show = subprocess.run(['scontrol', 'show', 'job', job_id], capture_output=True, text=True, check=False)
    return '\n'.join(parts + ['--- scontrol show job', show.stdout + show.stderr])


def wait_until(predicate, timeout, what, logs=lambda: ''):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f'{what}: not after {timeout} s\n{logs()}', pytrace=False)
        time.sleep(0.25)


def in_queue(job_id: str) -> bool:
    out = subprocess.run(
        ['squeue', '-h', '-j', job_id, '-o', '%T'], capture_output=True, text=True, timeout=30, check=False
    )
    return bool(out.stdout.strip())


def wait_results(folder: Path, job_id: str, ntasks: int, timeout: float, allow_error: bool = False):
    """Every task's submitit result (outcome, value), once all are written and the job has left the queue."""
    from submitit.core.utils import pickle_load

    paths = [Path(folder) / f'{job_id}_{t}_result.pkl' for t in range(ntasks)]
    logs = lambda: job_logs(folder, job_id)  # noqa: E731
    wait_until(
        lambda: all(p.exists() for p in paths) or (not in_queue(job_id) and any(p.exists() for p in paths)),
        timeout,
        f'results of job {job_id}',
        logs,
    )
    wait_until(lambda: not in_queue(job_id), 60, f'job {job_id} leaving the queue', logs)
    results = [pickle_load(p) if p.exists() else ('missing', None) for p in paths]
    if not allow_error:
        for outcome, value in results:
            assert outcome == 'success', f'{outcome}: {value}\n{logs()}'
    return results


def log_records(run_dir: Path):
    """log.jsonl records in file order (a resumed run appends; iterations after its checkpoint repeat)."""
    path = Path(run_dir) / 'log.jsonl'
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def last_iteration(run_dir: Path) -> int:
    return max((r['iteration'] for r in log_records(run_dir)), default=0)


def by_iteration(run_dir: Path) -> dict:
    return {r['iteration']: r for r in log_records(run_dir)}


def assert_same_training(ref_dir: Path, run_dir: Path) -> None:
    """Same logged losses at every iteration and bit-identical final student, teacher and DINO centre."""
    ref, got = by_iteration(ref_dir), by_iteration(run_dir)
    assert sorted(got) == sorted(ref)
    for i in ref:
        for key in ('train/loss', 'collapse/teacher_entropy', 'collapse/center_norm'):
            assert got[i][key] == ref[i][key], (i, key)
    a = ckpt.load_file(ckpt.resolve_checkpoint(ref_dir) / ckpt.MODEL_FILE)
    b = ckpt.load_file(ckpt.resolve_checkpoint(run_dir) / ckpt.MODEL_FILE)
    assert a['position']['iteration'] == b['position']['iteration']
    for part in ('student', 'teacher'):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert torch.equal(a['loss_center'], b['loss_center'])

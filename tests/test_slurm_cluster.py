"""The one-node SLURM cluster (skipssl_launch.slurm_cluster) runs sbatch, srun and submitit jobs, and requeues them.

Real cluster, no mocks: the `slurm_cluster` fixture (conftest.py) brings it up once per session.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from skipssl_launch import slurm_cluster as sc

ROOT = Path(__file__).resolve().parents[1]
# Jobs unpickle this module's functions by value, so they run whatever the job's working directory.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------- helpers


def wait_until(predicate, timeout, what, logs=lambda: ''):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f'{what}: not after {timeout} s\n{logs()}', pytrace=False)
        time.sleep(0.2)


def job_logs(job):
    """Every task's stdout/stderr tail and SLURM's view of the job, for failure messages."""
    parts = []
    for path in sorted(job.paths.folder.glob(f'{job.job_id}_*.out')) + sorted(
        job.paths.folder.glob(f'{job.job_id}_*.err')
    ):
        parts.append(f'--- {path.name}\n' + '\n'.join(path.read_text(errors='replace').splitlines()[-20:]))
    show = subprocess.run(['scontrol', 'show', 'job', job.job_id], capture_output=True, text=True, check=False)
    return '\n'.join(parts + ['--- scontrol show job', show.stdout + show.stderr])


def wait_results(job, timeout):
    wait_until(job.done, timeout, f'submitit job {job.job_id} done', lambda: job_logs(job))
    return job.results()


def executor(folder, **params):
    # timeout_min >= 10: submitit counts any signal in the first 80% of a job of under 10 min as a time-out.
    ex = submitit.AutoExecutor(folder=folder, cluster='slurm')
    ex.update_parameters(**{'timeout_min': 60, 'nodes': 1, 'tasks_per_node': 1, 'cpus_per_task': 1, **params})
    return ex


def restart_count():
    return int(os.environ.get('SLURM_RESTART_COUNT', '0'))


# ---------------------------------------------------------------- job bodies (run inside SLURM)


def rank_report():
    env = submitit.JobEnvironment()
    return env.global_rank, env.num_tasks, env.job_id


class Counter(submitit.helpers.Checkpointable):
    """Counts steps; `self` is the state submitit pickles when the preemption/time-out signal comes.

    The first run counts until it is requeued; the requeued run adds `extra` steps and returns them all,
    each tagged with the restart count of the run that made it.
    """

    def __init__(self):
        self.steps = []

    def __call__(self, extra, progress_file):
        while restart_count() == 0 or len(self.steps) < self.first_run_steps() + extra:
            self.steps.append(restart_count())
            Path(progress_file).write_text(str(len(self.steps)))
            time.sleep(0.1)
        return self.steps

    def first_run_steps(self):
        return self.steps.count(0)


def cooperative_train(run_dir, total_steps):
    """The pattern for a trainer: on the signal finish the iteration, save, requeue, exit; resume on restart.

    Replaces submitit's handler (which would checkpoint in the middle of an iteration) with a flag. A real
    multi-rank trainer all-reduces the flag so that every rank stops after the same step and saves together.
    """
    stop = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: stop.append(signum))
    env = submitit.JobEnvironment()
    run_dir = Path(run_dir)
    ckpt = run_dir / 'ckpt.json'
    step = start = json.loads(ckpt.read_text())['step'] if ckpt.exists() else 0
    log = run_dir / f'rank{env.global_rank}.log'
    while step < total_steps:
        with log.open('a') as f:
            f.write(f'begin {step}\n')
        time.sleep(0.2)  # the iteration the signal must not cut
        with log.open('a') as f:
            f.write(f'end {step}\n')
        step += 1
        if stop:
            if env.global_rank == 0:
                tmp = ckpt.with_suffix('.tmp')
                tmp.write_text(json.dumps({'step': step}))
                tmp.rename(ckpt)
                subprocess.run(['scontrol', 'requeue', env.job_id], check=True, timeout=30)
            sys.exit(0)  # SystemExit passes submitit by, so no result is written for this run
    return {'rank': env.global_rank, 'resumed_from': start, 'restarts': restart_count()}


# ---------------------------------------------------------------- tests without a cluster


def test_missing_packages_are_named():
    reason = sc.unavailable_reason(search_path='/nonexistent')
    assert 'slurmctld' in reason and sc.PACKAGES in reason


# ---------------------------------------------------------------- tests on the cluster


@pytest.mark.slurm
def test_cli_reports_the_running_cluster(slurm_cluster):
    def run(command):
        return subprocess.run(
            [sys.executable, '-m', 'skipssl_launch.slurm_cluster', command, '--dir', str(slurm_cluster.dir)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            check=False,
        )

    status = run('status')
    assert status.returncode == 0 and status.stdout.startswith('up'), status.stdout + status.stderr
    again = run('up')  # idempotent: reports the healthy cluster, restarts nothing
    assert again.returncode == 0 and 'already up' in again.stderr, again.stderr
    assert again.stdout.strip() == f'export SLURM_CONF={slurm_cluster.conf}'


@pytest.mark.slurm
def test_sbatch_runs_a_script(slurm_cluster, tmp_path):
    out = tmp_path / 'hello.out'
    job_id = subprocess.run(
        ['sbatch', '--parsable', f'--output={out}', '--wrap', 'echo hello from $SLURM_JOB_ID'],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    wait_until(lambda: out.exists() and out.read_text().strip(), 30, f'output of sbatch job {job_id}')
    assert out.read_text().strip() == f'hello from {job_id}'


@pytest.mark.slurm
def test_srun_runs_two_tasks(slurm_cluster):
    out = subprocess.run(
        ['srun', '-n', '2', 'bash', '-c', 'echo $SLURM_PROCID'], capture_output=True, text=True, check=True, timeout=60
    )
    assert sorted(out.stdout.split()) == ['0', '1']


@pytest.mark.slurm
def test_submitit_two_tasks_return_both_results(slurm_cluster, tmp_path):
    job = executor(tmp_path, tasks_per_node=2).submit(rank_report)
    results = wait_results(job, 60)
    assert sorted(results) == [(0, 2, job.job_id), (1, 2, job.job_id)]


@pytest.mark.slurm
def test_checkpointable_resumes_after_preemption_signal(slurm_cluster, tmp_path):
    progress = tmp_path / 'progress'
    job = executor(tmp_path / 'logs').submit(Counter(), 5, str(progress))
    wait_until(
        lambda: progress.exists() and int(progress.read_text() or 0) >= 5,
        60,
        'first run progress',
        lambda: job_logs(job),
    )
    # What SLURM preemption looks like to submitit (as its job._interrupt() does): SIGTERM, which its handler
    # ignores, then the preemption signal, on which it pickles Counter.checkpoint() and requeues the job.
    for sig in ('TERM', 'USR2'):
        subprocess.run(['scancel', f'--signal={sig}', job.job_id], check=True, timeout=30)
    steps = wait_results(job, 90)[0]
    first = steps.count(0)
    assert first >= 5 and steps == [0] * first + [1] * 5  # nothing of the first run is lost or redone
    logs = job_logs(job)
    assert 'Bypassing signal SIGTERM' in logs and 'this job is preempted' in logs and 'Requeued job' in logs


@pytest.mark.slurm
def test_checkpointable_is_requeued_at_its_time_limit(slurm_cluster, tmp_path):
    """--time=1 with signal_delay_s=50: SLURM signals the job before its time limit and submitit checkpoints and
    requeues it. When is SLURM's: sbatch(1) on --signal, "Due to the resolution of event handling by Slurm, the
    signal may be sent up to 60 seconds earlier than specified" (seen here 5 s after submission), so the test
    checks what the signal does, not when it comes."""
    progress = tmp_path / 'progress'
    job = executor(tmp_path / 'logs', timeout_min=1, slurm_signal_delay_s=50).submit(Counter(), 3, str(progress))
    steps = wait_results(job, 110)[0]
    first = steps.count(0)
    assert first >= 1 and steps == [0] * first + [1] * 3  # the first run's steps kept, then 3 more after the requeue
    assert 'this job is timed-out' in job_logs(job)


@pytest.mark.slurm
def test_cooperative_trainer_finishes_its_iteration_then_resumes(slurm_cluster, tmp_path):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    job = executor(tmp_path / 'logs', tasks_per_node=2).submit(cooperative_train, str(run_dir), 20)
    rank0_log = run_dir / 'rank0.log'
    wait_until(
        lambda: rank0_log.exists() and rank0_log.read_text().count('end') >= 3,
        60,
        'first run progress',
        lambda: job_logs(job),
    )
    subprocess.run(['scancel', '--signal=USR2', job.job_id], check=True, timeout=30)
    results = sorted(wait_results(job, 90), key=lambda r: r['rank'])
    saved = json.loads((run_dir / 'ckpt.json').read_text())['step']
    assert [r['rank'] for r in results] == [0, 1]
    assert all(r['resumed_from'] == saved and r['restarts'] == 1 for r in results)
    lines = rank0_log.read_text().split('\n')
    # The first run ended after a whole iteration, at the saved step; the second started there.
    assert f'end {saved - 1}' in lines and lines[lines.index(f'end {saved - 1}') + 1] == f'begin {saved}'
    assert lines.count(f'begin {saved}') == 1 and lines[-2] == 'end 19'

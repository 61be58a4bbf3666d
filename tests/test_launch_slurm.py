"""`skipssl-submit` against the real one-node SLURM cluster (tests/conftest.py::slurm_cluster): 2-task
CPU pretraining jobs with real DeepSpeed processes; preemption, `scontrol requeue` and the time-limit signal
requeue the job, which resumes exactly; evaluation jobs wait for the pretraining (afterok)."""

import json
import math
import re
import statistics
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from skipssl import checkpoint as ckpt

from .test_launch_helpers import (
    CPU2,
    SMALL,
    TINY,
    assert_same_training,
    in_queue,
    job_logs,
    last_iteration,
    log_records,
    make_pretrain_shards,
    scontrol_job,
    submit_cli,
    submitted,
    wait_results,
    wait_until,
)

pytestmark = [pytest.mark.slurm, pytest.mark.filterwarnings('ignore::DeprecationWarning')]


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    return make_pretrain_shards(tmp_path_factory.mktemp('launch_shards'))


def pretrain_args(shards, out, *extra, time_limit='10'):
    return [
        'pretrain',
        '--config',
        TINY,
        *CPU2,
        '--time',
        time_limit,
        *extra,
        f'data.train_shards={shards}',
        f'experiment.output_dir={out}',
        *SMALL,
    ]


@pytest.fixture(scope='module')
def reference(slurm_cluster, shards, tmp_path_factory):
    """An uninterrupted 2-task run through skipssl-submit: (run folder, CLI output, job id, log folder, results)."""
    out = tmp_path_factory.mktemp('reference') / 'run'
    proc = submit_cli(*pretrain_args(shards, out))
    job_id, folder = submitted(proc)
    results = wait_results(folder, job_id, 2, timeout=240)
    return out, proc, job_id, folder, results


def scancel_signal(job_id, *signals):
    for sig in signals:
        subprocess.run(['scancel', f'--signal={sig}', job_id], check=True, timeout=30)


def test_pretrain_job_runs_two_tasks_and_writes_checkpoints_and_tensorboard(reference):
    out, proc, job_id, folder, results = reference
    # what the CLI printed: job id, log folder, TensorBoard command
    assert folder == out / 'submitit' / job_id and folder.is_dir()
    assert f'tensorboard --logdir {out / "tb"}' in proc.stdout
    # one task per rank, env:// rendezvous from SLURM's environment, both return the summary
    summaries = [value for _, value in results]
    assert [(v['finished'], v['iterations'], v['device_hours']) for v in summaries] == [
        (True, 24, s['device_hours']) for s in summaries[:1]
    ] * 2
    s = summaries[0]
    assert s['finished'] and s['iterations'] == 24 and s['device']['world_size'] == 2 and s['global_batch'] == 64
    assert json.loads((out / 'summary.json').read_text()) == s
    record = ckpt.verify_checkpoint(out / 'checkpoints' / ckpt.checkpoint_name(24))
    assert record['world_size'] == 2 and {'rank-00000.pt', 'rank-00001.pt', 'model.pt'} <= set(record['files'])
    assert (out / 'export' / 'teacher.safetensors').is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / 'tb'), size_guidance={'scalars': 0})
    acc.Reload()
    assert len(acc.Scalars('train/loss')) == 24 and 'cost/core_hours' in acc.Tags()['scalars']
    # the sbatch script: the time-out signal, requeueable, one thread per CPU task
    script = (folder / f'{job_id}_submission.sh').read_text()
    for line in (
        '#SBATCH --signal=USR2@120',
        '#SBATCH --requeue',
        '#SBATCH --ntasks-per-node=2',
        '#SBATCH --cpus-per-task=1',
        'export OMP_NUM_THREADS=1',
    ):
        assert line in script, line
    assert 'gpus' not in script
    assert 'launcher: torchrun' in (folder / f'{job_id}_0_log.err').read_text()  # the env:// code path


def test_preempted_job_checkpoints_at_the_next_iteration_requeues_itself_and_matches(reference, shards, tmp_path):
    """SIGTERM then USR2 (what submitit's job._interrupt() sends, as SLURM preemption does): the trainer finishes
    its iteration, both ranks save, rank 0 requeues, the rerun resumes there and ends like the uninterrupted run."""
    out = tmp_path / 'run'
    job_id, folder = submitted(submit_cli(*pretrain_args(shards, out)))
    wait_until(lambda: last_iteration(out) >= 5, 180, 'iteration 5', lambda: job_logs(folder, job_id))
    scancel_signal(job_id, 'TERM', 'USR2')
    results = wait_results(folder, job_id, 2, timeout=240)
    assert all(value['finished'] and value['iterations'] == 24 for _, value in results)
    assert int(scontrol_job(job_id).get('Restarts', 0)) == 1
    err = (folder / f'{job_id}_0_log.err').read_text()
    stops = re.findall(r'SIG(?:TERM|USR2) received: checkpoint written at iteration (\d+)', err)
    assert len(stops) == 1 and 'requeued job' in err, err
    stopped_at = int(stops[0])
    assert 5 <= stopped_at < 24 and f'resumed from {out}/checkpoints/{ckpt.checkpoint_name(stopped_at)}' in err
    # no iteration lost or done twice: every iteration was logged exactly once, in order
    assert [r['iteration'] for r in log_records(out)] == list(range(1, 25))
    assert 'this job is preempted' not in err  # submitit's own handler never ran
    assert_same_training(reference[0], out)


def test_scontrol_requeue_resumes_from_the_newest_checkpoint(reference, shards, tmp_path):
    """`scontrol requeue` (SLURM requeues; the tasks get SIGTERM, then SIGKILL after KillWait): the rerun resumes
    from the newest complete checkpoint (the one written on SIGTERM if it made it in time) and matches."""
    out = tmp_path / 'run'
    job_id, folder = submitted(submit_cli(*pretrain_args(shards, out, 'train.checkpoint_every=4')))
    wait_until(lambda: last_iteration(out) >= 6, 180, 'iteration 6', lambda: job_logs(folder, job_id))
    subprocess.run(['scontrol', 'requeue', job_id], check=True, timeout=30)
    results = wait_results(folder, job_id, 2, timeout=240)
    assert all(value['finished'] and value['iterations'] == 24 for _, value in results)
    assert int(scontrol_job(job_id).get('Restarts', 0)) == 1
    assert 'resumed from' in (folder / f'{job_id}_0_log.err').read_text()
    assert_same_training(reference[0], out)


def run_processes(run_dir: Path) -> list:
    """Processes whose command line names the run folder (the job's tasks: submitit's log folder is inside it)."""
    out = subprocess.run(['pgrep', '-f', str(run_dir)], capture_output=True, text=True, check=False)
    return out.stdout.split()


def test_cancelled_job_is_not_requeued(reference, shards, tmp_path):
    """scancel sends SIGTERM before the kill, as preemption does; the trainer saves if it can, but a cancelled
    job must stay cancelled: the job sees SLURM ending it and does not requeue itself."""
    out = tmp_path / 'run'
    job_id, folder = submitted(submit_cli(*pretrain_args(shards, out)))
    wait_until(lambda: last_iteration(out) >= 3, 180, 'iteration 3', lambda: job_logs(folder, job_id))
    subprocess.run(['scancel', job_id], check=True, timeout=30)
    wait_until(lambda: not in_queue(job_id), 60, f'job {job_id} leaving the queue', lambda: job_logs(folder, job_id))
    # a requeue is issued by the job's own rank 0 before it exits: once none of the job's processes is left, any
    # requeue has happened (and would have put the job back in the queue)
    wait_until(lambda: not run_processes(out), 60, f'job {job_id} processes ending', lambda: job_logs(folder, job_id))
    assert not in_queue(job_id) and int(scontrol_job(job_id).get('Restarts', 0)) == 0, job_logs(folder, job_id)
    assert scontrol_job(job_id).get('JobState') == 'CANCELLED'
    err = (folder / f'{job_id}_0_log.err').read_text()
    assert 'requeued job' not in err
    if 'SIGTERM received: checkpoint written' in err:  # the trainer made it within KillWait (2 s here)
        assert 'not requeued: SLURM is ending job' in err


def test_signal_before_training_requeues_at_once(reference, shards, tmp_path):
    """USR2 while the job starts (before the trainer's handlers): the job's handler, not submitit's, takes it;
    rank 0 requeues and nothing ends in the middle of a collective; the rerun trains everything once."""
    out = tmp_path / 'run'
    job_id, folder = submitted(submit_cli(*pretrain_args(shards, out)))
    out0 = folder / f'{job_id}_0_log.out'
    wait_until(
        lambda: out0.exists() and 'Loading pickle' in out0.read_text(),
        120,
        'job start',
        lambda: job_logs(folder, job_id),
    )
    err0 = folder / f'{job_id}_0_log.err'  # logged once the job's handler replaced submitit's, before torch loads
    wait_until(
        lambda: err0.exists() and 'rank 0 of 2 on node' in err0.read_text(),
        120,
        'job handler installed',
        lambda: job_logs(folder, job_id),
    )
    assert not (out / 'log.jsonl').exists()
    scancel_signal(job_id, 'USR2')
    results = wait_results(folder, job_id, 2, timeout=240)
    assert all(value['finished'] for _, value in results)
    err = (folder / f'{job_id}_0_log.err').read_text()
    assert 'SIGUSR2 received outside training (nothing to save beyond the newest checkpoint): requeueing' in err
    assert 'this job is preempted' not in err
    assert int(scontrol_job(job_id).get('Restarts', 0)) == 1
    assert [r['iteration'] for r in log_records(out)] == list(range(1, 25))
    assert_same_training(reference[0], out)


def test_requeue_limit_fails_the_job_and_cancels_its_dependents(slurm_cluster, shards, tmp_path):
    """--max-requeues 0: the signal still gets a checkpoint, but the job fails with the reason instead of
    requeueing, and the evaluation jobs waiting on it (afterok) are cancelled, not left pending."""
    out = tmp_path / 'run'
    evals = make_eval_shards(tmp_path / 'eval')
    proc = submit_cli(
        'pipeline',
        '--config',
        TINY,
        *CPU2,
        '--time',
        '10',
        '--max-requeues',
        '0',
        '--eval-train-shards',
        evals['train'],
        '--eval-test-shards',
        evals['test'],
        f'data.train_shards={shards}',
        f'experiment.output_dir={out}',
        *SMALL,
    )
    job_id, folder = submitted(proc)
    dependents = [submitted(proc, kind)[0] for kind in ('knn', 'linear', 'report')]
    wait_until(lambda: last_iteration(out) >= 3, 180, 'iteration 3', lambda: job_logs(folder, job_id))
    scancel_signal(job_id, 'USR2')
    results = wait_results(folder, job_id, 2, timeout=120, allow_error=True)
    for outcome, value in results:
        assert outcome == 'error' and 'RequeueError' in value
        assert 'not requeued: 0 requeue(s) done, the maximum is 0 (--max-requeues)' in value
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['stopped_by'] == 'SIGUSR2' and not summary['finished']
    assert ckpt.list_checkpoints(out / 'checkpoints')[-1][0] == summary['iterations'] == last_iteration(out)
    for dep in dependents:
        wait_until(lambda dep=dep: scontrol_job(dep).get('JobState') in ('CANCELLED', None), 60, f'job {dep} cancelled')
    assert int(scontrol_job(job_id).get('Restarts', 0)) == 0


def make_eval_shards(folder: Path) -> dict:
    from .image_shards import write_pattern_shards

    return {
        'train': write_pattern_shards(folder / 'train', n=384, n_shards=2, prefix='train'),
        'test': write_pattern_shards(folder / 'test', n=128, n_shards=1, seed=1, prefix='test'),
    }


def test_pipeline_evaluation_jobs_wait_for_pretraining(slurm_cluster, shards, tmp_path):
    out = tmp_path / 'run'
    evals = make_eval_shards(tmp_path / 'eval')
    proc = submit_cli(
        'pipeline',
        '--config',
        TINY,
        *CPU2,
        '--time',
        '10',
        '--eval-train-shards',
        evals['train'],
        '--eval-test-shards',
        evals['test'],
        '--knn-args',
        '--k 5 10 --batch-size 64 --num-workers 0',
        '--linear-args',
        '--epochs 3 --batch-size 64 --num-workers 0',
        f'data.train_shards={shards}',
        f'experiment.output_dir={out}',
        *SMALL,
    )
    pre, folder = submitted(proc)
    knn, knn_folder = submitted(proc, 'knn')
    linear, _ = submitted(proc, 'linear')
    report, _ = submitted(proc, 'report')
    assert f'after pretrain job {pre} (afterok)' in proc.stdout
    # while the pretraining runs, the evaluations wait on it
    for job in (knn, linear):
        state = scontrol_job(job)
        assert state['Dependency'].startswith(f'afterok:{pre}') and state['JobState'] == 'PENDING', state
    assert scontrol_job(report)['Dependency'].startswith(f'afterok:{pre}')
    wait_results(folder, pre, 2, timeout=240)
    for job in (knn, linear, report):
        wait_results(knn_folder.parent / job, job, 1, timeout=240)
    # each evaluation started after the pretraining had ended (SLURM's times, and the jobs' own log stamps)
    pre_state = scontrol_job(pre)
    pre_done = log_time((folder / f'{pre}_0_log.out').read_text(), 'Job completed successfully')
    for job in (knn, linear, report):
        assert scontrol_job(job)['StartTime'] >= pre_state['EndTime']
        assert log_time((knn_folder.parent / job / f'{job}_0_log.out').read_text(), 'Starting with') > pre_done
    results = sorted(p.name for p in (out / 'eval').glob('*.json'))
    assert any(n.startswith('knn-') for n in results) and any(n.startswith('linear-') for n in results), results
    assert (out / 'report' / 'report.md').is_file()


def log_time(text: str, event: str) -> datetime:
    """The time stamp of submitit's log line announcing `event`."""
    line = next(ln for ln in text.splitlines() if event in ln)
    return datetime.strptime(line.split('(', 1)[1].split(')', 1)[0], '%Y-%m-%d %H:%M:%S,%f')


def run_seconds(job_id: str) -> int:
    h, m, sec = (int(x) for x in scontrol_job(job_id)['RunTime'].split('-')[-1].split(':'))
    return 3600 * h + 60 * m + sec


@pytest.mark.slow
def test_time_limit_signal_checkpoints_requeues_and_matches(reference, shards, tmp_path):
    """SLURM's time-out signal (--signal=USR2@100): once the job trains, its time limit is cut to 60-120 s from
    now, so SLURM sends USR2 at its next time-limit check (it sends it up to a minute early, on a 30 s timer) while
    the trainer still runs; the job saves at the next iteration boundary, requeues itself, and the rerun (given
    10 minutes, so the test sees one time-out) ends like an uninterrupted run. The run is made long enough for
    the signal to find it training, from the reference run's speed."""
    step = statistics.median(r['perf/step_time_s'] for r in log_records(reference[0])[2:])
    epochs = min(40, max(4, math.ceil(60 / (12 * step))))
    longer = [f'train.epochs={epochs}']
    out = tmp_path / 'run'
    job_id, folder = submitted(submit_cli(*pretrain_args(shards, out, '--signal-delay', '100'), *longer))
    logs = lambda: job_logs(folder, job_id)  # noqa: E731
    wait_until(lambda: last_iteration(out) >= 3, 180, 'iteration 3', logs)
    limit = math.ceil((run_seconds(job_id) + 60) / 60)
    subprocess.run(['scontrol', 'update', f'JobId={job_id}', f'TimeLimit={limit}'], check=True, timeout=30)
    wait_until(lambda: int(scontrol_job(job_id).get('Restarts', 0)) >= 1, 150, 'a time-out requeue', logs)
    subprocess.run(['scontrol', 'update', f'JobId={job_id}', 'TimeLimit=10'], check=True, timeout=30)
    results = wait_results(folder, job_id, 2, timeout=300)
    total = 12 * epochs
    assert all(value['finished'] and value['iterations'] == total for _, value in results)
    assert int(scontrol_job(job_id).get('Restarts', 0)) == 1
    err = (folder / f'{job_id}_0_log.err').read_text()
    stops = re.findall(r'SIGUSR2 received: checkpoint written at iteration (\d+)', err)
    assert len(stops) == 1 and 3 <= int(stops[0]) < total and 'launch: requeued job' in err, err[-3000:]
    assert [r['iteration'] for r in log_records(out)] == list(range(1, total + 1))
    ref = tmp_path / 'ref'
    ref_id, ref_folder = submitted(submit_cli(*pretrain_args(shards, ref), *longer))
    wait_results(ref_folder, ref_id, 2, timeout=300)
    assert_same_training(ref, out)


def test_bad_config_is_refused_before_submission(slurm_cluster, shards, tmp_path):
    before = subprocess.run(['squeue', '-h', '-o', '%i'], capture_output=True, text=True, check=True).stdout
    cases = [
        (['train.epoch=3'], "unknown config key 'train.epoch' (did you mean 'epochs'?)"),
        (['train.epochs=ten'], 'train.epochs: expected an integer'),
        ([f'data.train_shards={tmp_path / "nowhere"}'], 'data.train_shards'),
        (['data.batch_size_per_rank=4096'], 'less than one global batch'),
        (['model.kwargs.skip_indices=[0, 9]'], 'model:'),
    ]
    for overrides, message in cases:
        proc = submit_cli(*pretrain_args(shards, tmp_path / 'run'), *overrides)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert 'nothing submitted' in proc.stderr and message in proc.stderr, proc.stderr
        assert 'submitted' not in proc.stdout
    proc = submit_cli(*pretrain_args(shards, tmp_path / 'run'), '--gpus-per-node', '1', '--tasks-per-node', '1')
    assert proc.returncode == 2 and 'engine.device: cpu, but the job asks for --gpus-per-node 1' in proc.stderr
    assert not (tmp_path / 'run').exists()
    after = subprocess.run(['squeue', '-h', '-o', '%i'], capture_output=True, text=True, check=True).stdout
    assert after == before

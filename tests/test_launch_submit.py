"""skipssl_launch.submit without a SLURM cluster: argument and config checks before submission, the sbatch script it
asks for, and the same jobs through submitit's local executor (tasks as processes here, time-out signal and
requeue included) and debug executor (in this process)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from skipssl_launch import executor as ex
from skipssl_launch import submit
from skipssl_launch.jobs import available_entry_points

from .test_launch_helpers import (
    ROOT,
    SMALL,
    TINY,
    client_env,
    last_iteration,
    log_records,
    make_pretrain_shards,
    submit_cli,
    wait_until,
)

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    return make_pretrain_shards(tmp_path_factory.mktemp('launch_local_shards'))


def test_time_and_memory_in_slurm_formats():
    assert [ex.parse_time(t) for t in ('90', '10:30', '1:30:00', '2-00:00:00', '1-12', '0-00:00:01')] == [
        90,
        11,
        90,
        2880,
        2160,
        1,
    ]
    for bad in ('1h', '', '-5', '0'):
        with pytest.raises(ex.SubmitError, match='--time'):
            ex.parse_time(bad)
    assert (ex.parse_mem('64G'), ex.parse_mem('512M'), ex.parse_mem('1T'), ex.parse_mem('2048')) == (64, 0.5, 1024, 2)
    with pytest.raises(ex.SubmitError, match='--mem'):
        ex.parse_mem('lots')


def test_resources_one_task_per_gpu_and_cluster_limits():
    gpu = ex.Resources(nodes=2, gpus_per_node=8).check()
    assert (gpu.ntasks_per_node, gpu.world_size, gpu.ncpus_per_task) == (8, 16, 10)
    cpu = ex.Resources(tasks_per_node=2).check()
    assert (cpu.ntasks_per_node, cpu.world_size, cpu.ncpus_per_task) == (2, 2, 1)
    with pytest.raises(ex.SubmitError, match='one task per GPU'):
        ex.Resources(gpus_per_node=4, tasks_per_node=2).check()
    with pytest.raises(ex.SubmitError, match='--nodes must be 1'):
        ex.Resources(cluster='local', nodes=2).check()
    with pytest.raises(ex.SubmitError, match='use --cluster local for 2 tasks'):
        ex.Resources(cluster='debug', tasks_per_node=2).check()
    with pytest.raises(ex.SubmitError, match='not shorter than the time limit'):
        ex.Resources(time_min=2, signal_delay_s=120).check()


@pytest.mark.skipif(shutil.which('srun') is None, reason='submitit builds SLURM scripts only where srun exists')
def test_sbatch_script_asks_for_what_the_command_line_says(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    res = ex.Resources(
        nodes=2,
        gpus_per_node=8,
        time_min=2880,
        mem_gb=480,
        partition='gpu',
        account='proj',
        qos='high',
        constraint='a100',
        exclude='node[1-2]',
        max_requeues=5,
    ).check()
    executor = ex.make_executor(res, tmp_path / '%j', 'skipssl-pretrain', dependency='afterok:41')
    script = _make_sbatch_string(
        command='python -m submitit.core._submit x', folder=tmp_path / '%j', **executor.parameters
    )
    for flag in (
        '--nodes=2',
        '--ntasks-per-node=8',
        '--gpus-per-node=8',
        '--cpus-per-task=10',
        '--time=2880',
        '--mem=491520M',
        '--partition=gpu',
        '--account=proj',
        '--qos=high',
        '--constraint=a100',
        "--exclude='node[1-2]'",
        '--job-name=skipssl-pretrain',
        '--signal=USR2@120',
        '--requeue',
        '--dependency=afterok:41',
        '--kill-on-invalid-dep=yes',
    ):
        assert f'#SBATCH {flag}' in script, flag
    assert 'export OMP_NUM_THREADS=10' in script and executor.max_num_timeout == 5
    # a task that fails ends the others at once (skipssl.failure), as torchrun's agent does
    assert re.search(r'^srun .*--kill-on-bad-exit=1', script, re.M), script


@pytest.mark.slow
def test_bad_config_and_arguments_are_refused_before_anything_runs(shards, tmp_path, capsys):
    run = tmp_path / 'run'
    base = [
        'pretrain',
        '--config',
        TINY,
        '--cluster',
        'local',
        f'data.train_shards={shards}',
        f'experiment.output_dir={run}',
        *SMALL,
    ]
    for extra, message in (
        (['train.epoch=3'], "unknown config key 'train.epoch' (did you mean 'epochs'?)"),
        (['optim.base_lr=fast'], 'optim.base_lr: expected a number'),
        (['engine.device=cuda'], 'engine.device: cuda, but the job asks for no GPU'),
        (['data.batch_size_per_rank=4096'], 'less than one global batch'),
        (['--nodes', '2'], '--nodes must be 1'),
        (['--cluster', 'debug', '--tasks-per-node', '2'], 'use --cluster local for 2 tasks'),
        (['--time', '1h'], "--time '1h'"),
    ):
        assert submit.main(base + extra) == 2, extra
        captured = capsys.readouterr()
        assert 'nothing submitted' in captured.err and message in captured.err, captured.err
        assert 'submitted' not in captured.out
    assert (
        submit.main(
            [
                'knn',
                '--checkpoint',
                str(tmp_path / 'nothing'),
                '--train-shards',
                str(shards),
                '--test-shards',
                str(shards),
                '--cluster',
                'local',
            ]
        )
        == 2
    )
    assert 'does not exist' in capsys.readouterr().err
    assert (
        submit.main(
            [
                'pipeline',
                '--config',
                TINY,
                '--cluster',
                'local',
                f'data.train_shards={shards}',
                f'experiment.output_dir={run}',
                *SMALL,
            ]
        )
        == 2
    )
    assert '--eval-train-shards and --eval-test-shards' in capsys.readouterr().err
    assert not run.exists()
    # the real command line: exit status 2, one line naming the key, nothing started
    proc = submit_cli(*base, 'train.epoch=3')
    assert proc.returncode == 2 and "unknown config key 'train.epoch'" in proc.stderr and not run.exists()
    proc = submit_cli('pretrain', '--config', TINY, '--bogus', '1')
    assert proc.returncode == 2 and 'unrecognized arguments: --bogus' in proc.stderr


def test_debug_cluster_runs_the_job_in_this_process(shards, tmp_path):
    out = tmp_path / 'run'
    proc = submit_cli(
        'pretrain',
        '--config',
        TINY,
        '--cluster',
        'debug',
        f'data.train_shards={shards}',
        f'experiment.output_dir={out}',
        'data.samples_per_epoch=256',
        'train.epochs=1',
        'engine.device=cpu',
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert re.search(r'^pretrain job DEBUG_\d+ submitted \(debug: 1 node\(s\) x 1 task\(s\)', proc.stdout, re.M)
    assert 'pretrain: finished at iteration 8' in proc.stdout
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['finished'] and summary['device']['world_size'] == 1


def _task_processes(root: int):
    """The submitit task processes under the local job's controller (its pid, or its shell's)."""
    parent = {}
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue

    def descends(pid):
        while pid in parent and pid != root:
            pid = parent[pid]
        return pid == root

    tasks = []
    for pid in parent:
        try:
            cmdline = Path(f'/proc/{pid}/cmdline').read_bytes()
        except OSError:
            continue
        if pid != root and b'submitit.core._submit' in cmdline and descends(pid):
            tasks.append(pid)
    return tasks


@pytest.mark.slow
def test_local_cluster_requeues_on_the_preemption_signal_and_finishes(shards, tmp_path):
    """Two local processes get USR2 (what submitit's local controller sends before the time limit): the trainer
    saves at the next iteration boundary, the tasks exit with submitit's requeue code, the controller restarts
    them, they resume, and every iteration is trained exactly once."""
    out = tmp_path / 'run'
    cmd = [
        sys.executable,
        '-m',
        'skipssl_launch.submit',
        'pretrain',
        '--config',
        TINY,
        '--cluster',
        'local',
        '--tasks-per-node',
        '2',
        f'data.train_shards={shards}',
        f'experiment.output_dir={out}',
        *SMALL,
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=client_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: last_iteration(out) >= 5, 180, 'iteration 5')
        # the local job id is the controller's pid (or its shell's): the prefix of the job's files
        controller = int(next((out / 'submitit').glob('*_submitted.pkl')).name.split('_')[0])
        tasks = _task_processes(controller)
        assert len(tasks) == 2
        for pid in tasks:
            os.kill(pid, signal.SIGUSR2)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout + stderr[-3000:]
    m = re.search(r'^pretrain job (\d+) submitted .*\n\s+logs: (\S+)', stdout, re.M)
    job_id, folder = m.group(1), Path(m.group(2))
    assert int(job_id) == controller and 'pretrain: finished at iteration 24' in stdout
    assert (folder / f'{job_id}_requeues').read_text().strip() == '1'
    err = (folder / f'{job_id}_0_log.err').read_text()
    assert err.count('SIGUSR2 received: checkpoint written at iteration') == 1 and 'resumed from' in err
    assert [r['iteration'] for r in log_records(out)] == list(range(1, 25))


@pytest.mark.skipif(not {'knn', 'linear', 'report'} <= set(available_entry_points()), reason='evaluators missing')
def test_debug_pipeline_runs_pretraining_then_evaluations_then_the_report(shards, tmp_path):
    from .image_shards import write_pattern_shards

    train = write_pattern_shards(tmp_path / 'eval_train', n=256, n_shards=1, prefix='train')
    test = write_pattern_shards(tmp_path / 'eval_test', n=128, n_shards=1, seed=1, prefix='test')
    out = tmp_path / 'run'
    proc = submit_cli(
        'pipeline',
        '--config',
        TINY,
        '--cluster',
        'debug',
        '--eval-train-shards',
        train,
        '--eval-test-shards',
        test,
        '--knn-args',
        '--k 5 10 --num-workers 0',
        '--linear-args',
        '--epochs 3 --num-workers 0',
        f'data.train_shards={shards}',
        f'experiment.output_dir={out}',
        'data.samples_per_epoch=256',
        'train.epochs=1',
        'engine.device=cpu',
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    order = [m.group(1) for m in re.finditer(r'^(\w+) job DEBUG_\d+ submitted', proc.stdout, re.M)]
    assert order == ['pretrain', 'knn', 'linear', 'report']
    names = sorted(p.name for p in (out / 'eval').glob('*.json'))
    assert any(n.startswith('knn-') for n in names) and any(n.startswith('linear-') for n in names), names
    assert (out / 'report' / 'report.md').is_file()

"""A real two-node SLURM cluster (skipssl_launch.slurm_cluster with nodes=2: slurmds n1 and n2 on this machine) runs
multi-node jobs: srun places one task on each node, and `skipssl-submit pretrain --nodes 2` trains with
one DeepSpeed rank per node, its rendezvous at the first node of the job's node list.

No mocks: the `slurm_two_nodes` fixture (conftest.py) brings the daemons up for this module.
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from skipssl import checkpoint as ckpt
from skipssl_launch import slurm_cluster as sc

from .test_launch_helpers import (
    TINY,
    assert_same_training,
    by_iteration,
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

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slurm, pytest.mark.filterwarnings('ignore::DeprecationWarning')]


def test_cluster_folder_ports_and_names_stay_off_the_one_node_cluster(tmp_path):
    """The two kinds of cluster can run at once: their own folders, ports, node names and job numbers."""
    cluster = sc.Cluster(tmp_path, 2, sc.MULTI_NODE_CTLD_PORT)
    conf = sc._slurm_conf(cluster, cpus=1, memory_mb=1000)
    assert sc.MULTI_NODE_DIR != sc.DEFAULT_DIR and cluster.node_names == ('n1', 'n2')
    for line in (
        f'SlurmctldPort={sc.MULTI_NODE_CTLD_PORT}',
        f'FirstJobId={sc.MULTI_NODE_FIRST_JOB_ID}',
        f'NodeName=n1 NodeAddr=127.0.0.1 Port={sc.MULTI_NODE_CTLD_PORT + 1} CPUs=1 RealMemory=1000',
        f'NodeName=n2 NodeAddr=127.0.0.1 Port={sc.MULTI_NODE_CTLD_PORT + 2} CPUs=1 RealMemory=1000',
        'PartitionName=debug Nodes=n1,n2 ',
        f'SlurmdPidFile={tmp_path}/slurmd.%n.pid',
        f'SlurmdSpoolDir={tmp_path}/spool/%n',
    ):
        assert line in conf, line
    one = sc._slurm_conf(sc.Cluster(tmp_path), cpus=1, memory_mb=1000)
    assert 'SlurmctldPort' not in one and 'FirstJobId' not in one and f'SlurmdPidFile={tmp_path}/slurmd.pid' in one


def test_missing_namespace_tools_are_named_for_several_nodes_only(tmp_path):
    """A machine with SLURM but without unshare/mount still runs the one-node cluster; two nodes need them."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name in sc.BINARIES:  # a PATH with SLURM's programs (only found, never run) and without the namespace tools
        (bin_dir / name).write_text('#!/bin/sh\n')
        (bin_dir / name).chmod(0o755)
    reason = sc.unavailable_reason(search_path=str(bin_dir), nodes=2)
    assert reason and 'unshare, mount not found' in reason and sc.MULTI_NODE_PACKAGES in reason
    assert 'not found' not in (sc.unavailable_reason(search_path=str(bin_dir), nodes=1) or '')


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'skipssl_launch.slurm_cluster', *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_status_names_both_nodes(slurm_two_nodes):
    status = cli('status', '--dir', str(slurm_two_nodes.dir))
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.startswith('up') and 'n1: idle' in status.stdout and 'n2: idle' in status.stdout
    assert sc.cluster_at(slurm_two_nodes.dir) == slurm_two_nodes
    again = cli('up', '--nodes', '2', '--dir', str(slurm_two_nodes.dir))
    assert again.returncode == 0 and 'already up' in again.stderr, again.stderr  # idempotent: restarts nothing


def test_srun_places_one_task_on_each_node(slurm_two_nodes):
    """Each task reports the node slurmd ran it on, and that node names resolve inside the job (not outside)."""
    script = 'echo $SLURM_PROCID $SLURM_NODEID $SLURMD_NODENAME $(getent hosts n1 n2 | wc -l)'
    out = subprocess.run(
        ['srun', '-N', '2', '-n', '2', 'bash', '-c', script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.splitlines()) == ['0 0 n1 2', '1 1 n2 2']
    assert subprocess.run(['getent', 'hosts', 'n1'], capture_output=True, check=False).returncode != 0


# ---------------------------------------------------------------- DeepSpeed pretraining on two nodes


def pretrain_args(shards: Path, out: Path, *extra: str) -> list[str]:
    """2 nodes x 1 CPU rank of the tiny preset: 24 iterations of 2 x 32 images (two epochs of 768 samples)."""
    return [
        'pretrain',
        '--config',
        TINY,
        '--nodes',
        '2',
        '--tasks-per-node',
        '1',
        '--gpus-per-node',
        '0',
        '--cpus-per-task',
        '1',
        '--partition',
        'debug',
        '--time',
        '10',
        *extra,
        f'data.train_shards={shards}',
        f'experiment.output_dir={out}',
        'data.samples_per_epoch=768',
        'train.epochs=2',
        'train.log_every=1',
        'engine.device=cpu',
    ]


def rank_placement(folder: Path, job_id: str) -> dict[int, tuple[str, str]]:
    """rank -> (node, MASTER_ADDR) from the line skipssl_launch.jobs logs in each task's .err log before training."""
    placement = {}
    for path in Path(folder).glob(f'{job_id}_*_log.err'):
        for rank, node, addr in re.findall(
            r'rank (\d+) of 2 on node (\S+), rendezvous ([^:\s]+):\d+', path.read_text(errors='replace')
        ):
            placement[int(rank)] = (node, addr)
    return placement


@pytest.fixture(scope='module')
def shards(slurm_two_nodes, tmp_path_factory):
    return make_pretrain_shards(tmp_path_factory.mktemp('two_node_shards'))


@pytest.fixture(scope='module')
def two_node_run(slurm_two_nodes, shards, tmp_path_factory):
    """An uninterrupted 2-node x 1-task run through skipssl_launch.submit: (run folder, job id, log folder, results)."""
    out = tmp_path_factory.mktemp('two_node_reference') / 'run'
    started = time.monotonic()
    job_id, folder = submitted(submit_cli(*pretrain_args(shards, out)))
    results = wait_results(folder, job_id, 2, timeout=300)
    print(f'2-node x 1-task pretraining job {job_id}: {time.monotonic() - started:.1f} s from submission to results')
    return out, job_id, folder, results


def test_pretraining_runs_one_rank_on_each_node_with_the_rendezvous_on_the_first(two_node_run):
    out, job_id, folder, results = two_node_run
    job = scontrol_job(job_id)
    assert job['NumNodes'] == '2' and job['NumTasks'] == '2', job
    first_node = subprocess.run(
        ['scontrol', 'show', 'hostnames', job['NodeList']], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()[0]
    assert first_node == 'n1'
    assert rank_placement(folder, job_id) == {0: ('n1', first_node), 1: ('n2', first_node)}, job_logs(folder, job_id)
    summaries = [value for _, value in results]
    assert [(v['finished'], v['iterations'], v['device_hours']) for v in summaries] == [
        (True, 24, s['device_hours']) for s in summaries[:1]
    ] * 2
    s = summaries[0]
    assert s['finished'] and s['iterations'] == 24 and s['device']['world_size'] == 2 and s['global_batch'] == 64
    assert json.loads((out / 'summary.json').read_text()) == s
    assert [r['iteration'] for r in log_records(out)] == list(range(1, 25))
    record = ckpt.verify_checkpoint(out / 'checkpoints' / ckpt.checkpoint_name(24))
    assert record['world_size'] == 2


def test_preempted_two_node_job_requeues_and_ends_like_the_uninterrupted_run(two_node_run, shards, tmp_path):
    """SIGTERM then USR2 to both nodes' tasks (what submitit's job._interrupt() sends, as SLURM preemption does):
    both ranks finish the iteration and save together, rank 0 requeues, the rerun (again on n1 and n2) resumes
    there and ends with the losses and weights of the uninterrupted run."""
    out = tmp_path / 'run'
    job_id, folder = submitted(submit_cli(*pretrain_args(shards, out)))
    wait_until(lambda: last_iteration(out) >= 3, 180, 'iteration 3', lambda: job_logs(folder, job_id))
    for sig in ('TERM', 'USR2'):
        subprocess.run(['scancel', f'--signal={sig}', job_id], check=True, timeout=30)
    results = wait_results(folder, job_id, 2, timeout=300)
    assert all(value['finished'] and value['iterations'] == 24 for _, value in results)
    assert int(scontrol_job(job_id).get('Restarts', 0)) == 1
    err = (folder / f'{job_id}_0_log.err').read_text()
    stops = re.findall(r'SIG(?:TERM|USR2) received: checkpoint written at iteration (\d+)', err)
    assert len(stops) == 1 and 'requeued job' in err, err
    stopped_at = int(stops[0])
    assert 3 <= stopped_at < 24 and f'resumed from {out}/checkpoints/{ckpt.checkpoint_name(stopped_at)}' in err
    # both runs placed one rank on each node (the .err logs append across the requeue: two lines per rank)
    for rank, node in ((0, 'n1'), (1, 'n2')):
        text = (folder / f'{job_id}_{rank}_log.err').read_text()
        assert re.findall(rf'rank {rank} of 2 on node (\S+), rendezvous (\S+):', text) == [(node, 'n1')] * 2, text
    assert [r['iteration'] for r in log_records(out)] == list(range(1, 25))
    assert_same_training(two_node_run[0], out)


def test_two_node_run_continues_on_one_node_as_the_same_run(two_node_run, shards, tmp_path):
    """Elastic resume through the scheduler: the 2-node run stops at iteration 10 (mid-epoch), the same command on
    one node (1 task, 2 accumulation steps keep the global batch of 64) continues it, and it ends with the losses
    and weights of the uninterrupted 2-node run, to reduction order (docs/elastic_resume.md)."""
    out = tmp_path / 'run'
    job_id, folder = submitted(submit_cli(*pretrain_args(shards, out), 'train.stop_after_iterations=10'))
    [(_, first)] = wait_results(folder, job_id, 2, timeout=300)[:1]
    assert first['iterations'] == 10 and not first['finished']
    one_node = pretrain_args(shards, out)
    one_node[one_node.index('--nodes') + 1] = '1'  # the same command on the new allocation
    job_id, folder = submitted(submit_cli(*one_node))
    [(_, summary)] = wait_results(folder, job_id, 1, timeout=300)
    assert summary['finished'] and summary['iterations'] == 24 and summary['device']['world_size'] == 1
    err = (folder / f'{job_id}_0_log.err').read_text()
    assert re.search(r'world_size 2 -> 1.*global batch 64 kept', err), err
    ref, got = by_iteration(two_node_run[0]), by_iteration(out)
    assert sorted(got) == sorted(ref) == list(range(1, 25))
    for i in ref:
        assert got[i]['train/loss'] == pytest.approx(ref[i]['train/loss'], rel=1e-5), i
    a, b = (ckpt.load_file(ckpt.resolve_checkpoint(r) / ckpt.MODEL_FILE) for r in (two_node_run[0], out))
    for part in ('student', 'teacher'):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=1e-5, atol=2e-5, msg=f'{part} {k}')

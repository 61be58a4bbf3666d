"""A real two-node SLURM cluster (launch.slurm_cluster with nodes=2: slurmds n1 and n2 on this machine) runs
multi-node jobs: srun places one task on each node, and `python -m launch.submit pretrain --nodes 2` trains with
one DeepSpeed rank per node, its rendezvous at the first node of the job's node list.

No mocks: the `slurm_two_nodes` fixture (conftest.py) brings the daemons up for this module.
"""
import subprocess
import sys
from pathlib import Path

import pytest

from launch import slurm_cluster as sc

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slurm


def test_cluster_folder_ports_and_names_stay_off_the_one_node_cluster(tmp_path):
    """The two kinds of cluster can run at once: their own folders, ports, node names and job numbers."""
    cluster = sc.Cluster(tmp_path, 2, sc.MULTI_NODE_CTLD_PORT)
    conf = sc._slurm_conf(cluster, cpus=1, memory_mb=1000)
    assert sc.MULTI_NODE_DIR != sc.DEFAULT_DIR and cluster.node_names == ('n1', 'n2')
    for line in (f'SlurmctldPort={sc.MULTI_NODE_CTLD_PORT}', f'FirstJobId={sc.MULTI_NODE_FIRST_JOB_ID}',
                 f'NodeName=n1 NodeAddr=127.0.0.1 Port={sc.MULTI_NODE_CTLD_PORT + 1} CPUs=1 RealMemory=1000',
                 f'NodeName=n2 NodeAddr=127.0.0.1 Port={sc.MULTI_NODE_CTLD_PORT + 2} CPUs=1 RealMemory=1000',
                 'PartitionName=debug Nodes=n1,n2 ', f'SlurmdPidFile={tmp_path}/slurmd.%n.pid',
                 f'SlurmdSpoolDir={tmp_path}/spool/%n'):
        assert line in conf, line
    one = sc._slurm_conf(sc.Cluster(tmp_path), cpus=1, memory_mb=1000)
    assert 'SlurmctldPort' not in one and 'FirstJobId' not in one and f'SlurmdPidFile={tmp_path}/slurmd.pid' in one


def test_status_names_both_nodes(slurm_two_nodes):
    status = subprocess.run([sys.executable, '-m', 'launch.slurm_cluster', 'status', '--dir', str(slurm_two_nodes.dir)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.startswith('up') and 'n1: idle' in status.stdout and 'n2: idle' in status.stdout
    assert sc.cluster_at(slurm_two_nodes.dir) == slurm_two_nodes


def test_srun_places_one_task_on_each_node(slurm_two_nodes):
    """Each task reports the node slurmd ran it on, and that node names resolve inside the job (not outside)."""
    script = 'echo $SLURM_PROCID $SLURM_NODEID $SLURMD_NODENAME $(getent hosts n1 n2 | wc -l)'
    out = subprocess.run(['srun', '-N', '2', '-n', '2', 'bash', '-c', script],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.splitlines()) == ['0 0 n1 2', '1 1 n2 2']
    assert subprocess.run(['getent', 'hosts', 'n1'], capture_output=True, check=False).returncode != 0

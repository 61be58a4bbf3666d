"""skipssl_common.distributed: one reading of the launcher's environment for training, evaluation and launch."""

import subprocess
import sys
from pathlib import Path

import pytest

from skipssl_common import distributed as d

ROOT = Path(__file__).resolve().parents[1]
SLURM2 = {
    'SLURM_PROCID': '1',
    'SLURM_NTASKS': '2',
    'SLURM_LOCALID': '1',
    'SLURM_JOB_ID': '4321',
    'SLURM_JOB_NODELIST': 'n[1-2]',
}


def test_placement_of_each_launcher():
    assert d.placement({'RANK': '3', 'WORLD_SIZE': '4', 'LOCAL_RANK': '1'}) == d.Placement('torchrun', 3, 4, 1)
    assert d.placement(SLURM2) == d.Placement('slurm', 1, 2, 1)
    assert d.placement({'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'}) == d.Placement('single', 0, 1, 0)
    assert d.placement({}) == d.Placement('single', 0, 1, 0)
    assert d.world_size_from_env(SLURM2) == 2


def test_export_env_under_srun_without_torchrun(monkeypatch):
    monkeypatch.setattr(d, 'slurm_master_addr', lambda env: 'n1')
    env = dict(SLURM2)
    where = d.export_env(env)
    assert where == d.Placement('slurm', 1, 2, 1)
    assert {k: env[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')} == {
        'RANK': '1',
        'WORLD_SIZE': '2',
        'LOCAL_RANK': '1',
        'MASTER_ADDR': 'n1',
        'MASTER_PORT': str(20000 + 4321),
    }
    assert d.placement(env) == d.Placement('torchrun', 1, 2, 1)  # what DeepSpeed and torch then read


def test_export_env_keeps_what_torchrun_set():
    env = {'RANK': '0', 'WORLD_SIZE': '2', 'LOCAL_RANK': '0', 'MASTER_ADDR': 'h', 'MASTER_PORT': '29500'}
    d.export_env(env)
    assert env == {'RANK': '0', 'WORLD_SIZE': '2', 'LOCAL_RANK': '0', 'MASTER_ADDR': 'h', 'MASTER_PORT': '29500'}


def test_single_process_gets_a_free_local_port():
    env = {}
    d.export_env(env)
    assert env['RANK'] == '0' and env['WORLD_SIZE'] == '1' and env['MASTER_ADDR'] == '127.0.0.1'
    assert 0 < int(env['MASTER_PORT']) < 65536


def test_rendezvous_port_is_one_per_job():
    assert d.rendezvous_port('4321') == d.rendezvous_port('4321_7') == 24321
    assert d.rendezvous_port('24321') == 24321 and d.rendezvous_port('64321') == 24321
    assert d.rendezvous_port('local') == 20000


@pytest.mark.parametrize(
    'nodes,first', [('n[1-2]', 'n1'), ('gpu[07-09,12],cpu1', 'gpu07'), ('a,b', 'a'), ('host', 'host')]
)
def test_master_addr_without_scontrol(nodes, first, monkeypatch):
    def no_scontrol(*args, **kwargs):
        raise FileNotFoundError('scontrol')

    monkeypatch.setattr(d.subprocess, 'run', no_scontrol)
    assert d.slurm_master_addr({'SLURM_JOB_NODELIST': nodes}) == first


def test_launch_starts_without_heavy_imports():
    """A launch job installs its signal handlers within milliseconds: nothing on its import path loads torch,
    timm or deepspeed."""
    code = (
        'import sys, skipssl_launch.submit, skipssl_launch.jobs; '
        'print(sorted(m for m in ("torch", "timm", "deepspeed", "skipssl") if m in sys.modules))'
    )
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == '[]', out.stdout

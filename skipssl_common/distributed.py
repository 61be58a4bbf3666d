"""Where this process stands among a run's ranks, whatever started it: torchrun, SLURM's srun (or submitit), or a
plain single process; and the torch.distributed ``env://`` variables that follow from it (RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT: DeepSpeed and ``init_process_group`` read them, and without them
DeepSpeed falls back to MPI discovery). No torch here, so launch can use it without a heavy import.
"""

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import MutableMapping

Env = MutableMapping[str, str]
LAUNCHERS = ('torchrun', 'slurm', 'single')


@dataclass(frozen=True)
class Placement:
    """This process's rank in the run, read from the launcher's environment before any process group exists."""

    launcher: str  # one of LAUNCHERS
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for one-node rendezvous)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def rendezvous_port(job_id: str) -> int:
    """One port per scheduler job, so jobs sharing a node do not collide and every task of a job computes the same
    one without talking to the others (array jobs ``123_4`` use the array's id)."""
    digits = re.sub(r'\D', '', str(job_id).split('_')[0])
    return 20000 + int(digits or 0) % 20000


def slurm_master_addr(env: Env = os.environ) -> str:
    """The first host of this SLURM step (or job): where rank 0 runs."""
    nodes = env.get('SLURM_STEP_NODELIST') or env.get('SLURM_JOB_NODELIST', '')
    if not nodes:
        return '127.0.0.1'
    try:
        out = subprocess.run(['scontrol', 'show', 'hostnames', nodes], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # without scontrol: the first name of the compressed list, 'n[1-2],m3' -> 'n1'
        m = re.match(r'([^,\[]+)(?:\[(\d+))?', nodes)
        return m.group(1) + (m.group(2) or '') if m else '127.0.0.1'


def detect_launcher(env: Env = os.environ) -> str:
    """'torchrun' when the env:// variables are set (torchrun, or a launch job that exported them), 'slurm' for
    several srun tasks without them, 'single' otherwise."""
    if 'RANK' in env and 'WORLD_SIZE' in env:
        return 'torchrun'
    if 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
        return 'slurm'
    return 'single'


def placement(env: Env = os.environ) -> Placement:
    """This process's launcher, rank, world size and local rank, read from ``env`` without changing it."""
    launcher = detect_launcher(env)
    if launcher == 'torchrun':
        return Placement(launcher, int(env['RANK']), int(env['WORLD_SIZE']), int(env.get('LOCAL_RANK', '0')))
    if launcher == 'slurm':
        return Placement(
            launcher, int(env['SLURM_PROCID']), int(env['SLURM_NTASKS']), int(env.get('SLURM_LOCALID', '0'))
        )
    return Placement(launcher, 0, 1, int(env.get('LOCAL_RANK', '0')))


def world_size_from_env(env: Env = os.environ) -> int:
    """The number of ranks the launcher will start, read before any process group exists."""
    return placement(env).world_size


def export_env(env: Env = os.environ) -> Placement:
    """Fill in the env:// variables from what the launcher set (values already there are kept) and return the
    placement they describe."""
    where = placement(env)
    if where.launcher == 'slurm':
        env['RANK'] = str(where.rank)
        env['WORLD_SIZE'] = str(where.world_size)
        env['LOCAL_RANK'] = str(where.local_rank)
        env.setdefault('MASTER_ADDR', slurm_master_addr(env))
        env.setdefault('MASTER_PORT', str(rendezvous_port(env.get('SLURM_JOB_ID', '0'))))
    elif where.launcher == 'single':
        env.setdefault('RANK', '0')
        env.setdefault('WORLD_SIZE', '1')
        env.setdefault('MASTER_ADDR', '127.0.0.1')
        env.setdefault('MASTER_PORT', str(free_port()))
    env.setdefault('LOCAL_RANK', '0')
    return where

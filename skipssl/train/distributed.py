"""Process-group set-up for the three ways a run starts: torchrun, SLURM's srun (or submitit), or a plain
single process. Whatever the launcher, the environment ends up with RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT (DeepSpeed reads them; without them it falls back to MPI discovery)."""
import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable, List, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar('T')


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str                     # 'torchrun', 'slurm' or 'single'
    control_group: Optional[object] = None  # gloo group for small CPU-side collectives (flags, timers)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _slurm_master_addr() -> str:
    nodes = os.environ.get('SLURM_STEP_NODELIST') or os.environ.get('SLURM_JOB_NODELIST', '')
    if not nodes:
        return '127.0.0.1'
    try:
        out = subprocess.run(['scontrol', 'show', 'hostnames', nodes], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodes.split(',')[0].split('[')[0]


def detect_launcher(env=os.environ) -> str:
    if 'RANK' in env and 'WORLD_SIZE' in env:
        return 'torchrun'
    if 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
        return 'slurm'
    return 'single'


def world_size_from_env(env=os.environ) -> int:
    """The number of ranks the launcher will start, read before any process group exists."""
    launcher = detect_launcher(env)
    if launcher == 'torchrun':
        return int(env['WORLD_SIZE'])
    if launcher == 'slurm':
        return int(env['SLURM_NTASKS'])
    return 1


def export_env(launcher: str) -> None:
    """Fill in the torch.distributed env:// variables from what the launcher set."""
    env = os.environ
    if launcher == 'slurm':
        env['RANK'] = env['SLURM_PROCID']
        env['WORLD_SIZE'] = env['SLURM_NTASKS']
        env['LOCAL_RANK'] = env.get('SLURM_LOCALID', '0')
        env.setdefault('MASTER_ADDR', _slurm_master_addr())
        # one port per job, so jobs sharing a node do not collide
        env.setdefault('MASTER_PORT', str(20000 + int(env.get('SLURM_JOB_ID', '0')) % 20000))
    elif launcher == 'single':
        env.setdefault('RANK', '0')
        env.setdefault('WORLD_SIZE', '1')
        env.setdefault('LOCAL_RANK', '0')
        env.setdefault('MASTER_ADDR', '127.0.0.1')
        env.setdefault('MASTER_PORT', str(_free_port()))
    env.setdefault('LOCAL_RANK', '0')


def resolve_device(requested: str) -> str:
    if requested == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if requested == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError("engine.device=cuda but no CUDA device is visible (set engine.device=cpu or auto)")
    return requested


def init_distributed(device_kind: str) -> DistInfo:
    """Start the process group (nccl on CUDA, gloo on CPU) through DeepSpeed and pick this rank's device."""
    import deepspeed
    launcher = detect_launcher()
    export_env(launcher)
    rank, world, local = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ['LOCAL_RANK'])
    if device_kind == 'cuda':
        torch.cuda.set_device(local)
        device = torch.device('cuda', local)
    else:
        device = torch.device('cpu')
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend='nccl' if device_kind == 'cuda' else 'gloo', auto_mpi_discovery=False,
                                   verbose=False)
    control = dist.new_group(backend='gloo') if device_kind == 'cuda' else None
    return DistInfo(rank, world, local, device, launcher, control)


def shutdown(barrier: bool = True) -> None:
    """Leave the process group; without ``barrier`` on an error path, where peers may be in another collective."""
    # an explicit teardown: exiting with a live gloo group occasionally aborts the process at exit
    if dist.is_available() and dist.is_initialized():
        try:
            if barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def rank0_decides(fn: Callable[[], T], info: DistInfo) -> T:
    """``fn()`` run on rank 0 only, its result on every rank. If it raises, rank 0 raises that error and the
    other ranks raise PeerFailed, so a check that only rank 0 makes (files on rank 0's disk, say) cannot leave
    the ranks disagreeing."""
    from ..failure import PeerFailed, first_line
    box: List = [None]
    if info.is_main:
        try:
            box[0] = (True, fn())
        except Exception as exn:
            if info.world_size > 1:
                dist.broadcast_object_list([(False, first_line(exn))], src=0, group=info.control_group)
            raise
    if info.world_size > 1:
        dist.broadcast_object_list(box, src=0, group=info.control_group)
    ok, value = box[0]
    if not ok:
        raise PeerFailed(f"rank 0 refused: {value}")
    return value


def all_reduce_cpu(t: torch.Tensor, info: DistInfo, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Collective on a small CPU tensor (no device sync): the gloo control group on CUDA runs."""
    if info.world_size > 1:
        dist.all_reduce(t, op=op, group=info.control_group)
    return t

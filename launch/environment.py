"""Inside a submitit job: which cluster runs it, this task's rank, and torch.distributed's env:// variables.

Every task of a job gets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT from
the scheduler's view of the job (SLURM_PROCID, SLURM_NTASKS, ... through submitit's JobEnvironment; the
local executor's SUBMITIT_LOCAL_* variables), so the trainer and the evaluators start their process group
exactly as under ``torchrun``.
"""

import os
from dataclasses import dataclass
from typing import Dict

import submitit

from skipssl_common.distributed import free_port, rendezvous_port

TORCH_KEYS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


@dataclass(frozen=True)
class TaskInfo:
    cluster: str  # 'slurm', 'local' or 'debug'
    job_id: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def task_info() -> TaskInfo:
    """This task's place in the job; a plain process outside any submitit job is a one-task 'debug' job."""
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:
        return TaskInfo('debug', str(os.getpid()), 0, 1, 0, 1, '127.0.0.1')
    world = env.num_tasks
    nodes = max(env.num_nodes, 1)
    local_world = max(world // nodes, 1)
    master = env.hostnames[0] if env.cluster == 'slurm' else '127.0.0.1'
    return TaskInfo(env.cluster, str(env.job_id), env.global_rank, world, env.local_rank, local_world, master)


def export_torch_env(info: TaskInfo) -> Dict[str, str]:
    """Set (and return) the env:// rendezvous variables of this task. Values already in the environment from
    another launcher are replaced: the job's own view wins, so a requeued or nested job cannot inherit stale
    ones from the submitting shell."""
    port = rendezvous_port(info.job_id) if info.world_size > 1 else free_port()
    values = {
        'RANK': str(info.rank),
        'WORLD_SIZE': str(info.world_size),
        'LOCAL_RANK': str(info.local_rank),
        'LOCAL_WORLD_SIZE': str(info.local_world_size),
        'MASTER_ADDR': info.master_addr,
        'MASTER_PORT': str(port),
    }
    os.environ.update(values)
    return values

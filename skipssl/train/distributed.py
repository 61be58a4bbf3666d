"""Process-group set-up for training: the launcher's environment (``skipssl_common.distributed``) turned into a
DeepSpeed process group and this rank's device, and the small collectives the trainer needs."""

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

from skipssl_common.distributed import export_env

T = TypeVar('T')


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str  # 'torchrun', 'slurm' or 'single'
    control_group: Optional[dist.ProcessGroup] = None  # gloo group for small CPU-side collectives (flags, timers)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str) -> str:
    if requested == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if requested == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError('engine.device=cuda but no CUDA device is visible (set engine.device=cpu or auto)')
    return requested


def init_distributed(device_kind: str) -> DistInfo:
    """Start the process group (nccl on CUDA, gloo on CPU) through DeepSpeed and pick this rank's device."""
    import deepspeed

    where = export_env()
    rank, world, local = where.rank, where.world_size, where.local_rank
    if device_kind == 'cuda':
        torch.cuda.set_device(local)
        device = torch.device('cuda', local)
    else:
        device = torch.device('cpu')
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend='nccl' if device_kind == 'cuda' else 'gloo', auto_mpi_discovery=False, verbose=False
        )
    control = dist.new_group(backend='gloo') if device_kind == 'cuda' else None
    return DistInfo(rank, world, local, device, where.launcher, control)


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
        raise PeerFailed(f'rank 0 refused: {value}')
    return value


def all_reduce_cpu(t: torch.Tensor, info: DistInfo, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Collective on a small CPU tensor (no device sync): the gloo control group on CUDA runs."""
    if info.world_size > 1:
        dist.all_reduce(t, op=op, group=info.control_group)
    return t


class StopVote:
    """The ranks' agreement on a stop (the largest signal number any rank has received, 0 for none) without a
    blocking round trip per iteration: the vote started at one iteration boundary is read at the next, by when
    it has long arrived (one small gloo all-reduce in flight while the step runs). Every rank reads the same
    vote at the same boundary, so all stop at the same iteration, one iteration after the signal's; with one
    rank there is nothing to agree on and the signal is read at once."""

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self._pending: Optional[Tuple[dist.Work, torch.Tensor]] = None

    def __call__(self, signum: int) -> int:
        """The vote started at the previous boundary (0 at the first); when it is 0, this boundary's vote
        (``signum``, this rank's) is started."""
        if self.info.world_size <= 1:
            return signum
        decided = self.settle()
        if not decided:
            flag = torch.tensor([signum], dtype=torch.int64)
            work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.info.control_group, async_op=True)
            assert work is not None  # async_op
            self._pending = (work, flag)
        return decided

    def settle(self) -> int:
        """The vote in flight, waited for (0 if none): where no further boundary comes (the end of an epoch)."""
        if self._pending is None:
            return 0
        work, flag = self._pending
        self._pending = None
        work.wait()
        return int(flag[0])

"""Ranks for evaluation: set up from the launcher's environment, features gathered on rank 0.

Extraction runs on every rank over a disjoint part of the shards; rank 0 gathers the parts, sorts them and
runs the (single-process) k-NN search or linear probe. Gathering goes in fixed-size row chunks, so no rank
ever holds more than its own part plus one chunk per rank besides rank 0's result.
"""

import os
import sys
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from skipssl.failure import FailureWatch
from skipssl_common.distributed import export_env, placement


@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device('cpu')
    owns_group: bool = False  # initialised here, so torn down here
    watch: Optional[FailureWatch] = None  # ends this rank when another fails (skipssl.failure)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Leave the group without a barrier: rank 0 may still be evaluating, long after the others are done.
        Called (from a ``finally``) while an error propagates, it keeps the group and the failure watch: the entry
        point (``skipssl_eval.cli.run``) then ends the whole job at once instead of leaving peers in a collective."""
        if self.watch is not None and sys.exc_info()[1] is not None:
            return
        if self.watch is not None:
            self.watch.stop()
            self.watch = None
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def from_env(device: str = 'auto') -> Ranks:
    """Ranks from the launcher's environment (torchrun, srun with or without submitit: see
    ``skipssl_common.distributed``); one process otherwise. An already initialised process group is used as it is."""
    where = placement()
    use_cuda = torch.cuda.is_available() if device == 'auto' else device.startswith('cuda')
    dev = torch.device('cuda', where.local_rank) if use_cuda else torch.device('cpu')
    if use_cuda:
        torch.cuda.set_device(dev)
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), dev, False)
    if where.world_size <= 1:
        return Ranks(0, 1, dev, False)
    export_env()
    dist.init_process_group('nccl' if use_cuda else 'gloo')
    rank = dist.get_rank()
    prog = os.path.basename(sys.argv[0]) or 'evaluation'
    return Ranks(rank, dist.get_world_size(), dev, True, FailureWatch(rank, dist.get_world_size(), prog).start())


def comm_device(ranks: Ranks) -> torch.device:
    return ranks.device if dist.get_backend() == 'nccl' else torch.device('cpu')


def gather_rows(x: torch.Tensor, ranks: Ranks, chunk_rows: int = 1 << 15) -> Optional[torch.Tensor]:
    """The ranks' row blocks of ``x`` (CPU, same trailing shape and dtype) concatenated in rank order on
    rank 0 (None elsewhere)."""
    if not ranks.distributed:
        return x
    counts: List[int] = [0] * ranks.world_size
    dist.all_gather_object(counts, int(x.shape[0]))
    dev = comm_device(ranks)
    out = [torch.empty((c, *x.shape[1:]), dtype=x.dtype) for c in counts] if ranks.main else None
    for start in range(0, max(counts), chunk_rows):
        piece = torch.zeros((chunk_rows, *x.shape[1:]), dtype=x.dtype, device=dev)
        mine = x[start : start + chunk_rows]
        piece[: len(mine)] = mine.to(dev)
        bucket = [torch.empty_like(piece) for _ in range(ranks.world_size)] if ranks.main else None
        dist.gather(piece, bucket, dst=0)
        if ranks.main:
            for r, got in enumerate(bucket):
                n = max(0, min(chunk_rows, counts[r] - start))
                out[r][start : start + n] = got[:n].cpu()
    return torch.cat(out) if ranks.main else None


def gather_objects(obj, ranks: Ranks) -> Optional[list]:
    """Every rank's ``obj`` in a list on rank 0 (None elsewhere)."""
    if not ranks.distributed:
        return [obj]
    bucket = [None] * ranks.world_size if ranks.main else None
    dist.gather_object(obj, bucket, dst=0)
    return bucket


def broadcast_object(obj, ranks: Ranks):
    """Rank 0's ``obj`` on every rank."""
    if not ranks.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean_(tensors: List[torch.Tensor], ranks: Ranks) -> None:
    """Average gradients of replicated parameters in place (the linear heads of the augmented probe)."""
    if not ranks.distributed:
        return
    dev = comm_device(ranks)
    for t in tensors:
        buf = t if t.device == dev else t.to(dev)  # nccl reduces device tensors only
        dist.all_reduce(buf)
        buf.div_(ranks.world_size)
        if buf is not t:
            t.copy_(buf)

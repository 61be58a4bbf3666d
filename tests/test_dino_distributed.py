"""DINO's centre is averaged over the global batch: 2 gloo processes match one process on the same data."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from skipssl.dino import DINOLoss

K, B_PER_RANK, N_CROPS, WORLD = 64, 3, 4, 2


def global_batch():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(N_CROPS, WORLD * B_PER_RANK, K, generator=g)
    teacher = torch.randn(2, WORLD * B_PER_RANK, K, generator=g) + 2.0
    return student, teacher


def rank_slice(x, rank):
    """The rank's images, every crop of them, crop-major."""
    part = x[:, rank * B_PER_RANK : (rank + 1) * B_PER_RANK]
    return part.reshape(-1, K)


def _worker(rank, init_file, out_dir):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    try:
        student, teacher = global_batch()
        loss_fn = DINOLoss(K)
        for _ in range(2):
            loss = loss_fn(rank_slice(student, rank), rank_slice(teacher, rank), 0.04)
        torch.save({'center': loss_fn.center, 'loss': loss}, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_center_equals_single_process_center_on_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=WORLD, join=True)
    student, teacher = global_batch()
    single = DINOLoss(K)
    single(student.reshape(-1, K), teacher.reshape(-1, K), 0.04)
    center_after_step1 = single.center.clone()
    single(student.reshape(-1, K), teacher.reshape(-1, K), 0.04)
    assert not torch.equal(single.center, center_after_step1)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f'rank{rank}.pt', weights_only=True)
        torch.testing.assert_close(got['center'], single.center)
        # each rank's step-2 loss is the loss of its own images under the shared (global) centre
        local = DINOLoss(K)
        local.center.copy_(center_after_step1)
        torch.testing.assert_close(got['loss'], local(rank_slice(student, rank), rank_slice(teacher, rank), 0.04))

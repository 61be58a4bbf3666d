"""Elastic resume: a run checkpointed on 2 ranks continues on 1 or 3 (and another ZeRO stage) as the same
experiment. The data reader's global batches do not depend on ranks or loader workers (same keys, same crops);
real torchrun runs resized in mid-epoch give the losses, weights and Adam moments of the uninterrupted run to
reduction-order tolerance; a resize that cannot keep the global batch is refused before any work."""

import json
import shutil
import time

import pytest
import torch
from torch.utils.data import DataLoader

from skipssl import checkpoint as ckpt
from skipssl.config import load_config
from skipssl.data import MultiCropTransform, ReaderState, resolve_shards
from skipssl.data.slots import SlotShards, iterations, join
from skipssl.train import state as train_state

from .image_shards import write_pattern_shards
from .precision import param as precision_param
from .test_train import TINY, final_weights, log_lines, run

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    return write_pattern_shards(tmp_path_factory.mktemp('shards'), n=512, n_shards=4)


# -- the reader ----------------------------------------------------------------------------------------------
GLOBAL, SLOTS, IPE = 12, 6, 5


def global_batches(urls, world_size, workers, state=None, limit=None):
    """Global batches (keys, labels, crops) as ``world_size`` ranks with ``workers`` loader workers each read them,
    and every slot's position after the last one: the ranks' shares concatenated in rank order."""
    transform = MultiCropTransform(load_config(TINY).augment)
    per_rank, positions = [], ReaderState(offsets=[0] * SLOTS, skipped=[0] * SLOTS, unreadable=[0] * SLOTS)
    for rank in range(world_size):
        ds = SlotShards(
            urls,
            global_batch=GLOBAL,
            n_slots=SLOTS,
            iterations_per_epoch=IPE,
            transform=transform,
            rank=rank,
            world_size=world_size,
            num_workers=workers,
            seed=3,
            shuffle_buffer=64,
            channels=1,
        )
        if state is not None:
            ds.set_state(state)
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        accum = {1: 4, 2: 2}.get(world_size, 1)  # micro-batches of 3 images cut slots' contributions of 2
        shares = []
        for share in iterations(iter(loader), ds, accum):
            shares.append([join(pieces) for pieces in share['micro']])
            for chunk in share['chunks']:
                positions.record(chunk['slot'], chunk)
            if limit and len(shares) == limit:
                break
        per_rank.append(shares)
    batches = []
    for i in range(len(per_rank[0])):
        micro = [m for shares in per_rank for m in shares[i]]
        batches.append(
            {
                'keys': [k for m in micro for k in m['keys']],
                'labels': torch.cat([m['labels'] for m in micro]),
                'crops': [torch.cat(views) for views in zip(*(m['crops'] for m in micro))],
            }
        )
    return batches, positions


def assert_same(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x['keys'] == y['keys'], i
        assert torch.equal(x['labels'], y['labels']), i
        for u, v in zip(x['crops'], y['crops'], strict=True):
            assert torch.equal(u, v), i


def test_global_batches_and_augmentations_do_not_depend_on_ranks_or_workers(shards):
    urls = resolve_shards(str(shards))
    ref, _ = global_batches(urls, 1, 0)
    assert len(ref) == IPE and all(len(b['keys']) == GLOBAL for b in ref)
    seen = [k for b in ref for k in b['keys']]
    assert len(set(seen)) == len(seen)  # an epoch's samples, none twice
    for world_size, workers in ((2, 0), (2, 2), (3, 1), (6, 3)):
        got, _ = global_batches(urls, world_size, workers)
        assert_same(ref, got)


def test_reader_resumed_on_other_ranks_and_workers_continues_every_slot(shards):
    """2 ranks x 1 worker read 2 global batches; their slot positions, handed to 3 ranks x 2 workers, give the
    rest of the epoch: every sample once, the same batches as an uninterrupted read."""
    urls = resolve_shards(str(shards))
    ref, _ = global_batches(urls, 1, 0)
    first, positions = global_batches(urls, 2, 1, limit=2)
    assert global_batches(urls, 3, 2, limit=2)[1] == global_batches(urls, 1, 0, limit=2)[1] == positions
    positions.step = 2
    rest, _ = global_batches(urls, 3, 2, state=ReaderState.from_dict(json.loads(json.dumps(positions.state_dict()))))
    assert_same(ref, first + rest)


# -- training -------------------------------------------------------------------------------------------------
# a global batch of 48 images in 6 virtual slots: 2 ranks x 24, 1 rank x 24 x 2 accumulation steps, 3 ranks x 16;
# 192 samples per epoch = 4 iterations, 2 epochs; a constant teacher temperature
ELASTIC = [
    'data.samples_per_epoch=192',
    'train.epochs=2',
    'train.log_every=1',
    'data.virtual_slots=6',
    'data.batch_size_per_rank=24',
    'loss.warmup_teacher_temp_epochs=0',
    'train.attention_images=0',
]


def assert_same_run(ref, out, rtol=1e-5, atol=2e-5):
    """Reduction order differs between layouts. The attention key bias has a zero gradient up to rounding (softmax
    ignores it), and AdamW turns that noise into steps of its own: a few 1e-6 after 6 steps, so ``atol``; a lost
    optimizer state or a different sample moves weights by about the lr (1e-3)."""
    a, b = log_lines(ref), log_lines(out)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for i in a:
        assert b[i]['train/loss'] == pytest.approx(a[i]['train/loss'], rel=1e-5), i
    wa, wb = final_weights(ref), final_weights(out)
    for part in ('student', 'teacher'):
        for k in wa[part]:
            torch.testing.assert_close(wb[part][k], wa[part][k], rtol=rtol, atol=atol, msg=f'{part} {k}')
    torch.testing.assert_close(wb['loss_center'], wa['loss_center'], rtol=rtol, atol=1e-6)
    oa, ob = (ckpt.load_file(ckpt.resolve_checkpoint(r) / train_state.OPTIMIZER_FILE) for r in (ref, out))
    assert oa['step'] == ob['step']
    for key in ('exp_avg', 'exp_avg_sq'):
        for name, v in oa['state'][key].items():
            torch.testing.assert_close(ob['state'][key][name], v, rtol=1e-4, atol=1e-7, msg=f'{key} {name}')


@pytest.mark.slow
@pytest.mark.parametrize('zero, one_rank_zero, three_ranks_zero', [(1, 0, 2), (2, 2, 1)])
def test_resume_on_one_and_three_ranks_mid_epoch_is_the_same_run(
    shards, tmp_path, zero, one_rank_zero, three_ranks_zero
):
    ref, stopped = tmp_path / 'ref', tmp_path / 'stopped'
    run(ref, shards, *ELASTIC, f'engine.zero_stage={zero}', nproc=2)
    run(stopped, shards, *ELASTIC, f'engine.zero_stage={zero}', 'train.stop_after_iterations=2', nproc=2)
    layout = json.loads((stopped / 'checkpoints' / 'ckpt-00000002' / ckpt.COMPLETE).read_text())['layout']
    assert layout == {
        'world_size': 2,
        'zero_stage': zero,
        'precision': 'fp32',
        'micro_batch': 24,
        'accum': 1,
        'global_batch': 48,
        'slots': 6,
    }
    for nproc, extra in (
        (1, [f'engine.zero_stage={one_rank_zero}']),
        (3, [f'engine.zero_stage={three_ranks_zero}', 'data.batch_size_per_rank=16']),
    ):
        out = tmp_path / f'on{nproc}'
        shutil.copytree(stopped, out)
        proc = run(out, shards, *ELASTIC, *extra, nproc=nproc)
        assert 'ckpt-00000002 (epoch 0, iteration 2)' in proc.stderr, proc.stderr[-3000:]
        changed = f'world_size 2 -> {nproc}'
        assert changed in proc.stderr and 'global batch 48 kept' in proc.stderr, proc.stderr[-3000:]
        if nproc == 1:
            assert 'accum 1 -> 2' in proc.stderr
        summary = json.loads((out / 'summary.json').read_text())
        assert summary['finished'] and summary['global_batch'] == 48 and summary['device']['world_size'] == nproc
        assert_same_run(ref, out)
        record = ckpt.verify_checkpoint(ckpt.resolve_checkpoint(out))
        assert record['layout']['world_size'] == nproc and record['layout']['slots'] == 6


@pytest.mark.slow
def test_a_resize_that_cannot_keep_the_global_batch_is_refused_before_any_work(shards, tmp_path):
    out = tmp_path / 'run'
    run(out, shards, *ELASTIC, 'train.stop_after_iterations=1', nproc=2)
    before = sorted(p.name for p in (out / 'checkpoints').iterdir())
    start = time.monotonic()
    proc = run(out, shards, *ELASTIC, 'data.batch_size_per_rank=32', check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert (
        line.startswith('pretrain.py: ')
        and 'global batch of 48 images cannot be kept on 1 ranks with data.batch_size_per_rank=32' in line
        and 'resumes on [] ranks' not in line
    ), line
    assert 'on 1 ranks set data.batch_size_per_rank to one of [48, 24, 16, 12' in line, line
    assert time.monotonic() - start < 60 and 'it 2/' not in proc.stderr
    assert sorted(p.name for p in (out / 'checkpoints').iterdir()) == before
    # 4 ranks cannot share 6 slots, whatever the micro-batch: refused before a job is even submitted
    with pytest.raises(
        ckpt.CheckpointError,
        match=r'6 virtual slots .* which 4 ranks cannot share equally: it '
        r'resumes on \[1, 2, 3, 6\] ranks',
    ):
        train_state.check_resumable(out / 'checkpoints', 4, None, 12)
    assert train_state.check_resumable(out / 'checkpoints', 3, None, 8).name == 'ckpt-00000001'


# -- the optimizer state, whatever the partitioning ---------------------------------------------------------------
LAYOUTS = [(0, 'fp32'), (0, 'bf16'), (1, 'fp32'), (1, 'bf16'), (2, 'fp32'), (2, 'bf16')]


def _optimizer_worker(rank, world, port, out_dir, precision):
    import os

    import deepspeed
    import torch.distributed as dist
    from torch import nn

    from skipssl.dino import param_groups, reset_state
    from skipssl.train.engine import EngineView

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)
    )
    deepspeed.init_distributed(dist_backend='gloo', auto_mpi_discovery=False, verbose=False)
    try:
        out = {}
        for stage, _ in [layout for layout in LAYOUTS if layout[1] == precision]:
            torch.manual_seed(0)
            # sizes chosen so that ZeRO's flat partitions cut through a parameter
            model = nn.Sequential(nn.Linear(13, 40), nn.GELU(), nn.Linear(40, 7), nn.LayerNorm(7), nn.Linear(7, 5))
            cfg = {
                'train_micro_batch_size_per_gpu': 4,
                'gradient_accumulation_steps': 1,
                'zero_optimization': {'stage': stage},
                'zero_allow_untested_optimizer': True,
                'steps_per_print': 1 << 30,
            }
            if precision == 'bf16':
                cfg['bf16'] = {'enabled': True}
            engine, _, _, _ = deepspeed.initialize(
                model=model, optimizer=torch.optim.AdamW(param_groups(model)), config=cfg
            )
            view = EngineView(engine)
            reset_state(view.base_optimizer)  # as build_engine does: no step from DeepSpeed's own state set-up
            x = torch.randn(4, 13, generator=torch.Generator().manual_seed(rank)).to(next(model.parameters()).dtype)
            engine.backward(engine(x).float().pow(2).mean())
            engine.step()
            stepped = view.full_optimizer_state()
            g = torch.Generator().manual_seed(7)  # the same full state on every rank, as loaded from optimizer.pt
            saved = {
                'state': {
                    k: {n: torch.randn(p.shape, generator=g) for n, p in zip(view.names, view.params)}
                    for k in ('exp_avg', 'exp_avg_sq')
                },
                'step': {grp['name']: 5.0 + i for i, grp in enumerate(view.base_optimizer.param_groups)},
            }
            view.set_full_optimizer_state(saved)
            out[f'{stage}-{precision}'] = {'stepped': stepped, 'saved': saved, 'loaded': view.full_optimizer_state()}
        torch.save(out, os.path.join(out_dir, f'rank{rank}.pt'))
        dist.barrier()
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


@pytest.mark.parametrize('precision', [precision_param(p, precision=p) for p in ('fp32', 'bf16')])
def test_optimizer_state_round_trips_exactly_through_every_partitioning(tmp_path, precision):
    """AdamW's state as full per-parameter tensors: after one step on the same data, ZeRO 1/2's partitions (over 2
    ranks, cut through parameters) assemble to what ZeRO 0 holds whole at the same precision, and a full state
    loaded into any layout (ZeRO 0, 1, 2; fp32, bf16) reads back bit for bit on every rank."""
    import torch.multiprocessing as mp

    from skipssl_common.distributed import free_port

    mp.spawn(_optimizer_worker, args=(2, free_port(), str(tmp_path), precision), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    for stage, _ in [layout for layout in LAYOUTS if layout[1] == precision]:
        name, whole = f'{stage}-{precision}', ranks[0][f'0-{precision}']['stepped']
        for r in ranks:
            got = r[name]
            assert got['stepped']['step'] == whole['step'], name
            for key, values in whole['state'].items():
                for n, v in values.items():
                    assert v.abs().sum() > 0, (key, n)  # a real step's state
                    tol = dict(rtol=1e-5, atol=1e-12) if name.endswith('fp32') else dict(rtol=0.05, atol=1e-6)
                    torch.testing.assert_close(
                        got['stepped']['state'][key][n],
                        v,
                        **tol,
                        msg=lambda m, name=name, key=key, n=n: f'{name} {key} {n}: {m}',
                    )
            assert got['loaded']['step'] == got['saved']['step'], name
            for key, values in got['saved']['state'].items():
                for n, v in values.items():
                    assert torch.equal(got['loaded']['state'][key][n], v), (name, key, n)

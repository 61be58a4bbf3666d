"""Per-parameter clipping and the fp32 master weights inside real DeepSpeed engines (2 gloo processes),
checked against DeepSpeed's own full-gradient / full-fp32-parameter accessors."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from skipssl_common.distributed import free_port

from .precision import param as precision_param

WORLD = 2
MAX_NORM = 4.0


def _model():
    torch.manual_seed(0)
    # sizes chosen so that ZeRO's flat partitions cut through a parameter
    return nn.Sequential(nn.Linear(13, 40), nn.GELU(), nn.Linear(40, 7), nn.LayerNorm(7), nn.Linear(7, 5))


def _worker(rank, port, stage, precision, out_dir):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)
    )
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from skipssl.dino import param_groups
    from skipssl.train.engine import EngineView

    deepspeed.init_distributed(dist_backend='gloo', auto_mpi_discovery=False, verbose=False)
    try:
        model = _model()
        opt = torch.optim.AdamW(param_groups(model), lr=1e-2)
        cfg = {
            'train_micro_batch_size_per_gpu': 4,
            'gradient_accumulation_steps': 1,
            'zero_optimization': {'stage': stage},
            'zero_allow_untested_optimizer': True,
            'steps_per_print': 1 << 30,
        }
        if precision == 'bf16':
            cfg['bf16'] = {'enabled': True}
        elif precision == 'fp16':  # dynamic loss scaling: gradients carry the scale until step()
            cfg['fp16'] = {'enabled': True, 'loss_scale': 0, 'initial_scale_power': 8}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        view = EngineView(engine)
        dtype = next(engine.module.parameters()).dtype
        out = {'partitioned': view.partitioned, 'steps': [], 'scales': []}
        for step in range(2):
            g = torch.Generator().manual_seed(100 * step + rank)
            x = torch.randn(4, 13, generator=g).to(dtype)
            loss = engine(x).float().pow(2).mean() * 10
            engine.backward(loss)
            scale = view.loss_scale
            out['scales'].append(scale)
            full = [safe_get_full_grad(p).float().clone() / scale for p in view.params]
            norms = view.clip_per_param(MAX_NORM)
            clipped = [safe_get_full_grad(p).float().clone() / scale for p in view.params]
            engine.step()
            master = [m.clone() for m in view.master_params()]
            reference = [safe_get_full_fp32_param(p).clone() if view.partitioned else None for p in view.params]
            out['steps'].append(
                {
                    'full': full,
                    'norms': norms.clone(),
                    'clipped': clipped,
                    'master': master,
                    'reference_master': reference,
                    'module': [p.detach().float().clone() for p in view.params],
                }
            )
        torch.save(out, os.path.join(out_dir, f'rank{rank}.pt'))
        dist.barrier()
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


@pytest.mark.parametrize(
    'stage,precision',
    [
        precision_param(stage, precision, precision=precision)
        for stage, precision in [(2, 'fp32'), (2, 'bf16'), (1, 'bf16'), (0, 'bf16'), (1, 'fp16'), (2, 'fp16')]
    ],
)
def test_clip_per_param_and_master_weights_match_deepspeed(tmp_path, stage, precision):
    mp.spawn(_worker, args=(free_port(), stage, precision, str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(WORLD)]
    assert results[0]['partitioned'] == (stage > 0)
    # fp16's gradients are scaled (2^8 here) when the trainer clips: norms and clipping are of the unscaled ones
    assert all(s == (256.0 if precision == 'fp16' else 1.0) for s in results[0]['scales']), results[0]['scales']
    for step in range(2):
        r0 = results[0]['steps'][step]
        for r in results:  # every rank sees the same full gradients and assembles the same master weights
            s = r['steps'][step]
            for a, b in zip(s['full'], r0['full']):
                torch.testing.assert_close(a, b)
            for a, b in zip(s['master'], r0['master']):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        ref_norms = torch.stack([g.norm() for g in r0['full']])
        tol = dict(rtol=1e-2, atol=1e-5) if precision in ('bf16', 'fp16') else dict(rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r0['norms'], ref_norms, **tol)
        assert (ref_norms > MAX_NORM).any() and (ref_norms < MAX_NORM).any(), ref_norms  # both branches used
        for g, c in zip(r0['full'], r0['clipped']):
            expected = g * min(1.0, MAX_NORM / (g.norm().item() + 1e-6))
            torch.testing.assert_close(c, expected, **tol)
        for m, ref, lp in zip(r0['master'], r0['reference_master'], r0['module']):
            assert m.dtype == torch.float32
            if ref is not None:
                torch.testing.assert_close(m, ref, rtol=0, atol=0)
            # the module holds the master weights rounded to its precision
            low = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision)
            torch.testing.assert_close(lp, m.to(low).float() if low else m, rtol=0, atol=0)

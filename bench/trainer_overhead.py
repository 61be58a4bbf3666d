"""The trainer against a bare PyTorch loop of the same model, crops and optimizer, measured in one run.

    python -m bench.trainer_overhead                                   # the demo's ViT config, 1 process, CPU
    python -m bench.trainer_overhead --config configs/demo_fmnist_skipat.yaml --iterations 120 --repeats 3

The bare loop is DINO's ``train_one_epoch`` with nothing around it: the same student (``build_student``),
teacher, DINOLoss, torch AdamW over DINO's parameter groups, per-iteration schedules, per-parameter clipping and
EMA, fed by the same reader and multi-crop transform with the same loader workers, and one host sync per step
(DINO's ``loss.item()``). The trainer is ``pretrain.py`` itself (DeepSpeed engine, reader state, collapse
monitors, stop-signal check, logging), one process without a launcher. Both run in fresh processes with the
same threads, alternating, on synthetic image shards written here; a rate is taken over the iterations after
``--warmup`` (the trainer's from its own log intervals, so start-up, checkpoints and exports are not in it).
Each rate is split into data wait and compute, which is where the difference is looked for.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]


# -- the bare loop (runs in its own process) -------------------------------------------------------------
def bare_loop(config: str, shards: str, iterations: int, warmup: int, overrides: List[str]) -> Dict:
    """DINO's training loop with the project's pieces and nothing else; (images/s, data wait, compute)
    over the iterations after ``warmup``."""
    import torch
    from torch.utils.data import DataLoader

    from skipssl.config import load_config
    from skipssl.data import MultiCropTransform, SlotShards, resolve_shards
    from skipssl.data.slots import batches
    from skipssl.dino import (
        DINOLoss,
        apply_schedules,
        clip_gradients_per_param,
        ema_update,
        make_teacher,
        matching_parameters,
        param_groups,
    )
    from skipssl.train.plan import build_student, make_plan, make_schedules

    cfg = load_config(config, overrides)
    plan = make_plan(cfg, 1)
    sched = make_schedules(cfg, plan)
    torch.manual_seed(cfg.experiment.seed)
    student = build_student(cfg)
    teacher = make_teacher(student)
    teacher_params, student_params = matching_parameters(teacher, student)
    loss_fn = DINOLoss(cfg.head.out_dim, cfg.loss.student_temp, cfg.loss.center_momentum)
    optimizer = torch.optim.AdamW(param_groups(student))
    d = cfg.data
    dataset = SlotShards(
        resolve_shards(shards),
        global_batch=plan.global_batch,
        n_slots=plan.slots,
        iterations_per_epoch=plan.iterations_per_epoch,
        transform=MultiCropTransform(cfg.augment),
        num_workers=d.num_workers,
        seed=cfg.experiment.seed,
        shuffle_buffer=d.shuffle_buffer,
        channels=d.channels,
    )
    loader = DataLoader(
        dataset, batch_size=None, num_workers=d.num_workers, prefetch_factor=4 if d.num_workers else None
    )
    student.train()
    stream = batches(loader, dataset)  # the global batch, as the trainer joins it (one process)
    wait = compute = 0.0
    for it in range(iterations):
        t0 = time.perf_counter()
        crops = next(stream)['crops']
        t1 = time.perf_counter()
        apply_schedules(
            optimizer, float(sched.lr[it]), float(sched.wd[it]), freeze_last_layer=it < sched.freeze_last_layer_iters
        )
        with torch.no_grad():
            teacher_out = teacher(crops[:2])
        loss = loss_fn(student(crops), teacher_out, float(sched.teacher_temp[it]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.clip_grad > 0:
            clip_gradients_per_param(student.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        with torch.no_grad():
            ema_update(teacher_params, student_params, float(sched.momentum[it]))
        loss.item()
        t2 = time.perf_counter()
        if it >= warmup:
            wait, compute = wait + t1 - t0, compute + t2 - t1
    n = iterations - warmup
    return {'images_per_s': n * plan.global_batch / (wait + compute), 'data_wait_s': wait / n, 'compute_s': compute / n}


# -- the trainer (pretrain.py in its own process) ----------------------------------------------------------
def trainer_run(
    config: str, shards: str, iterations: int, warmup: int, overrides: List[str], env: Dict, out: Path, batch: int
) -> Dict:
    """pretrain.py for ``iterations``, logging every ``warmup`` iterations; the rate of the log intervals after
    the first, for ``batch`` images per iteration."""
    cmd = [
        sys.executable,
        str(ROOT / 'pretrain.py'),
        '--config',
        config,
        f'data.train_shards={shards}',
        f'experiment.output_dir={out}',
        'train.epochs=1',
        f'train.log_every={warmup}',
        f'train.checkpoint_every={iterations}',
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f'pretrain.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
    records = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    steps = [r for r in records if 'perf/step_time_s' in r][1:]  # the first interval holds the warm-up
    if not steps:
        raise RuntimeError(f'pretrain.py logged no interval after the warm-up in {out / "log.jsonl"}')
    step = statistics.fmean(r['perf/step_time_s'] for r in steps)
    wait = statistics.fmean(r['perf/data_wait_s'] for r in steps)
    return {'images_per_s': batch / step, 'data_wait_s': wait, 'compute_s': step - wait}


def bare_run(config: str, shards: str, iterations: int, warmup: int, overrides: List[str], env: Dict) -> Dict:
    cmd = [
        sys.executable,
        '-m',
        'bench.trainer_overhead',
        '--bare-loop',
        '--config',
        config,
        '--shards',
        shards,
        '--iterations',
        str(iterations),
        '--warmup',
        str(warmup),
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f'bare loop failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_shards(folder: Path, config: str, overrides: List[str], samples: int) -> str:
    """Synthetic labelled images at the config's evaluation size and channels, in the shard writer's format."""
    from skipssl.config import load_config
    from skipssl_eval.synthetic import write_shards

    d = load_config(config, overrides).data
    size = max(d.eval_resize or 0, 32)
    write_shards(
        folder, 'train', [samples // 2, samples - samples // 2], num_classes=10, size=size, channels=d.channels
    )
    return str(folder / 'train-index.json')


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default=str(ROOT / 'configs' / 'demo_fmnist_vit.yaml'))
    p.add_argument('--iterations', type=int, default=80, help='per run; a multiple of --warmup')
    p.add_argument('--warmup', type=int, default=20, help='iterations left out of the rate (also the log interval)')
    p.add_argument('--repeats', type=int, default=2, help='trainer / bare-loop pairs, alternating order')
    p.add_argument('--threads', type=int, default=os.cpu_count(), help='torch threads of the one process')
    p.add_argument('--shards', help='image shards (default: synthetic, written to a temporary folder)')
    p.add_argument('--bare-loop', action='store_true', help=argparse.SUPPRESS)  # the child process
    p.add_argument('--out', type=Path, default=None)
    p.add_argument('overrides', nargs='*', help='config overrides for both (key=value)')
    args = p.parse_args(argv)
    if args.iterations <= args.warmup or args.iterations % args.warmup:
        p.error(f'--iterations {args.iterations} must be a multiple of --warmup {args.warmup}, and larger')
    if args.bare_loop:
        result = bare_loop(args.config, args.shards, args.iterations, args.warmup, args.overrides)
        print(json.dumps(result))
        return result

    import torch

    from bench.backbone_throughput import RESULTS_DIR, device_name, write_json

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    torch.set_num_threads(args.threads)
    runs: Dict[str, List[Dict]] = {'trainer': [], 'bare_loop': []}
    with tempfile.TemporaryDirectory(prefix='trainer-overhead-') as tmp:
        from skipssl.config import load_config
        from skipssl.train.plan import global_batch

        cfg = load_config(args.config, args.overrides)
        batch = global_batch(cfg.data.batch_size_per_rank, cfg.train.grad_accum_steps, 1)  # one process
        # one epoch of exactly --iterations steps, so the trainer stops where the bare loop does
        overrides = [*args.overrides, f'data.samples_per_epoch={args.iterations * batch}']
        shards = args.shards or make_shards(
            Path(tmp) / 'shards', args.config, overrides, max(2048, args.iterations * batch)
        )
        for r in range(args.repeats):
            for kind in ('trainer', 'bare_loop') if r % 2 == 0 else ('bare_loop', 'trainer'):
                if kind == 'trainer':
                    res = trainer_run(
                        args.config, shards, args.iterations, args.warmup, overrides, env, Path(tmp) / f'run{r}', batch
                    )
                else:
                    res = bare_run(args.config, shards, args.iterations, args.warmup, overrides, env)
                runs[kind].append(res)
                print(
                    f'  {kind:9s} {res["images_per_s"]:8.1f} img/s  data wait {1e3 * res["data_wait_s"]:7.2f} ms'
                    f'  compute {1e3 * res["compute_s"]:7.2f} ms per iteration',
                    flush=True,
                )
    ratios = [t['images_per_s'] / b['images_per_s'] for t, b in zip(runs['trainer'], runs['bare_loop'])]
    med = {
        k: {m: statistics.median(x[m] for x in v) for m in ('images_per_s', 'data_wait_s', 'compute_s')}
        for k, v in runs.items()
    }
    report = {
        'benchmark': 'trainer_overhead',
        'date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'device': device_name(torch.device('cpu')),
        'load_average': list(os.getloadavg()),
        'config': os.path.relpath(args.config, ROOT),
        'overrides': args.overrides,
        'processes': 1,
        'threads': args.threads,
        'iterations': args.iterations,
        'warmup': args.warmup,
        'global_batch': batch,
        'num_workers': cfg.data.num_workers,
        'trainer_over_bare_loop': statistics.median(ratios),
        'overhead_pct': 100.0 * (1.0 - statistics.median(ratios)),
        'median': med,
        'runs': runs,
        'difference_per_iteration_ms': {
            m: 1e3 * (med['trainer'][m] - med['bare_loop'][m]) for m in ('data_wait_s', 'compute_s')
        },
    }
    print(f'trainer / bare loop: {report["trainer_over_bare_loop"]:.3f} ({report["overhead_pct"]:+.1f}% overhead)')
    write_json(report, args.out or RESULTS_DIR / 'trainer_overhead_cpu.json')
    return report


if __name__ == '__main__':
    main()

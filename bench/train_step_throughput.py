"""Training throughput of the whole DINO step (student + teacher + loss + DeepSpeed optimizer step + EMA),
SkipAt-ViT against the plain ViT of the same size, measured interleaved in one run.

    # CUDA: bf16, batch 64/GPU, eager and compiled; CPU: fp32, batch 4
    python -m bench.train_step_throughput
    python -m bench.train_step_throughput --size small --batch-size 32 --n-local 10

The step is the trainer's own (``skipssl.train.step.DINOStep`` on a real DeepSpeed engine, one process), on
synthetic crops already on the device (2 x 224 + n_local x 96 per image), so data loading is excluded (see
bench.data_throughput for that). Model FLOPs per image are counted by torch's FLOP counter: student
forward + backward (3x forward) over every crop, teacher forward over the 2 global crops; on a GPU with a
known bf16 peak the model FLOP utilisation (MFU) is reported.
"""

import argparse
import os
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Sequence

import torch

from bench.backbone_throughput import (
    RESULTS_DIR,
    VIT_VS_SKIPAT_KEYS,
    compile_modes,
    device_name,
    pick_device,
    run_header,
    write_json,
)
from skipssl.config import Config, load_config
from skipssl.dino import DINOLoss, make_teacher
from skipssl.models import count_macs
from skipssl.models.throughput import interleaved_rates, rate_report
from skipssl.train.engine import build_engine
from skipssl.train.plan import Plan, build_student, make_schedules
from skipssl.train.step import DINOStep
from skipssl_common.distributed import free_port

CONFIGS = {'vit': 'dino_vit_s16_100ep.yaml', 'skipat': 'dino_skipat_vit_s16_100ep.yaml'}
CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs'
# dense bf16 tensor-core peaks (TFLOP/s), from the vendors' data sheets
BF16_PEAK_TFLOPS = {
    'H100 80GB HBM3': 989.0,
    'H100 SXM': 989.0,
    'H100 PCIe': 756.0,
    'H200': 989.0,
    'A100': 312.0,
    'L40S': 362.0,
    'A10G': 70.0,
}


def peak_tflops(name: str):
    for key, value in BF16_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def model_flops_per_image(student, global_size: int, local_size: int, n_local: int, in_chans: int) -> float:
    """Student fwd+bwd (3 x fwd) over 2 global + n_local local crops, teacher fwd over the 2 global crops."""

    def fwd(size):
        return 2 * (
            count_macs(student.backbone, (1, in_chans, size, size))
            + count_macs(student.head, (1, student.backbone.num_features))
        )

    student_fwd = 2 * fwd(global_size) + n_local * fwd(local_size)
    return 3 * student_fwd + 2 * fwd(global_size)


class StepBench(NamedTuple):
    run: Callable[[], None]  # one whole DINO step
    flops: float  # model FLOPs per image (model_flops_per_image)
    backbones: Dict[str, torch.nn.Module]  # 'student', 'teacher'


def step_config(key: str, args, device: torch.device, extra_overrides: Sequence[str] = ()) -> Config:
    """The config of the benchmark's DINO step for ``key`` ('vit' or 'skipat'), with ``extra_overrides``
    (config overrides, e.g. ``model.attention=explicit``) on top."""
    overrides = [
        f'engine.precision={args.precision}',
        f'engine.device={device.type}',
        f'engine.zero_stage={args.zero_stage}',
        f'data.batch_size_per_rank={args.batch_size}',
        f'augment.n_local={args.n_local}',
        f'model.compile={str(args.compile_model).lower()}',
        'data.train_shards=unused',
        f'model.kwargs.img_size={args.global_size}',
    ]
    if args.head_out_dim:
        overrides.append(f'head.out_dim={args.head_out_dim}')
    if args.size != 'small':
        name = {'vit': f'vit_{args.size}_patch16_224', 'skipat': f'vit_{args.size}_patch16_skipat_224'}[key]
        overrides.append(f'model.name={name}')
    return load_config(CONFIG_DIR / CONFIGS[key], [*overrides, *extra_overrides])


def build_step(key: str, args, device: torch.device, extra_overrides: Sequence[str] = ()) -> StepBench:
    """The trainer's DINO step for ``key`` on synthetic crops (:func:`step_config`)."""
    cfg = step_config(key, args, device, extra_overrides)
    plan = Plan(1, args.batch_size, 1, iterations_per_epoch=1000, epochs=cfg.train.epochs)
    torch.manual_seed(0)
    student = build_student(cfg)
    flops = model_flops_per_image(student, args.global_size, args.local_size, args.n_local, 3)
    teacher = make_teacher(student).to(device)
    engine = build_engine(student, cfg, 1, device.type)
    if cfg.model.compile:
        engine.module.backbone.compile()
        teacher.backbone.compile()
    loss_fn = DINOLoss(cfg.head.out_dim, cfg.loss.student_temp, cfg.loss.center_momentum).to(device)
    step = DINOStep(engine, teacher, loss_fn, cfg, make_schedules(cfg, plan))
    g = torch.Generator(device=device).manual_seed(0)
    crops = [
        torch.randn(args.batch_size, 3, s, s, device=device, generator=g)
        for s in [args.global_size] * 2 + [args.local_size] * args.n_local
    ]
    state = {'it': 20 * plan.iterations_per_epoch}  # past warm-up and the last-layer freeze

    def run():
        step.micro(crops, state['it'])
        step.finish(state['it'])
        state['it'] += 1

    return StepBench(run, flops, {'student': engine.module.backbone, 'teacher': teacher.backbone})


def measure(args, device) -> Dict:
    runs, flops = {}, {}
    for key in CONFIGS:
        runs[key], flops[key], _ = build_step(key, args, device)
    rates = interleaved_rates(runs, args.batch_size, args.iters, args.repeats, device, warmup=args.warmup)
    out = {
        'batch_size': args.batch_size,
        'compile': args.compile_model,
        'model_gflops_per_image': {k: flops[k] / 1e9 for k in CONFIGS},
        **rate_report(rates, 'vit', 'skipat', VIT_VS_SKIPAT_KEYS),
    }
    peak = peak_tflops(device_name(device)) if device.type == 'cuda' else None
    if peak:
        out['bf16_peak_tflops'] = peak
        out['mfu'] = {k: out[f'{k}_img_per_s'] * flops[k] / (peak * 1e12) for k in CONFIGS}
    print(
        f'  batch {args.batch_size} compile={args.compile_model}: ViT {out["vit_img_per_s"]:.1f} img/s, SkipAt '
        f'{out["skipat_img_per_s"]:.1f} img/s, ratio {out["ratio_skipat_over_vit"]:.3f}x'
        + (f', MFU ViT {out["mfu"]["vit"]:.1%} SkipAt {out["mfu"]["skipat"]:.1%}' if peak else ''),
        flush=True,
    )
    return out


def parse_args(argv=None):
    """The command line with the device's defaults filled in: (args, device)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--size', default='small', choices=['tiny', 'small', 'base'])
    p.add_argument('--device', default='auto')
    p.add_argument('--precision', default=None, choices=['fp32', 'bf16'], help='default: bf16 on CUDA, fp32 on CPU')
    p.add_argument('--zero-stage', type=int, default=0)
    p.add_argument('--batch-size', type=int, default=None, help='per device; default 64 on CUDA, 4 on CPU')
    p.add_argument('--n-local', type=int, default=10)
    p.add_argument('--head-out-dim', type=int, default=None, help="DINO head prototypes (default: the config's, 65536)")
    p.add_argument('--global-size', type=int, default=224)
    p.add_argument('--local-size', type=int, default=96)
    p.add_argument('--compile', default=None, choices=['off', 'on', 'both'], help='default: both on CUDA, off on CPU')
    p.add_argument('--repeats', type=int, default=None, help='default: 5 on CUDA, 3 on CPU')
    p.add_argument('--iters', type=int, default=None, help='default: 10 on CUDA, 1 on CPU')
    p.add_argument('--warmup', type=int, default=None, help='default: 5 on CUDA, 1 on CPU')
    p.add_argument('--out', type=Path, default=None)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == 'cuda'
    args.precision = args.precision or ('bf16' if cuda else 'fp32')
    args.batch_size = args.batch_size or (64 if cuda else 4)
    args.compile = args.compile or ('both' if cuda else 'off')
    args.repeats = args.repeats or (5 if cuda else 3)
    args.iters = args.iters or (10 if cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    return args, device


def init_process_group(device: torch.device) -> None:
    """A one-process group (nccl on CUDA, gloo on CPU), as DeepSpeed's engine needs one; on a free port, so
    that benchmarks started side by side on one machine do not meet at one rendezvous and wait forever."""
    for key, value in (
        ('RANK', '0'),
        ('WORLD_SIZE', '1'),
        ('LOCAL_RANK', '0'),
        ('MASTER_ADDR', '127.0.0.1'),
        ('MASTER_PORT', str(free_port())),
    ):
        os.environ.setdefault(key, value)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    import deepspeed

    deepspeed.init_distributed(
        dist_backend='nccl' if device.type == 'cuda' else 'gloo', auto_mpi_discovery=False, verbose=False
    )


def header(args, device: torch.device) -> Dict:
    return {
        **run_header('train_step_throughput', device),
        'configs': CONFIGS,
        'size': args.size,
        'precision': args.precision,
        'zero_stage': args.zero_stage,
        'head_out_dim': args.head_out_dim or 'config',
        'crops': {'global': [2, args.global_size], 'local': [args.n_local, args.local_size]},
        'repeats': args.repeats,
        'iters_per_repeat': args.iters,
    }


def main(argv=None) -> Dict:
    args, device = parse_args(argv)
    init_process_group(device)
    print(
        f'DINO step ({args.size}/16, 2x{args.global_size} + {args.n_local}x{args.local_size} crops, {args.precision}) '
        f'on {device_name(device)}'
    )
    results = []
    for compile_model in compile_modes(args.compile):
        args.compile_model = compile_model
        results.append(measure(args, device))
    report = dict(header(args, device), results=results)
    write_json(report, args.out or RESULTS_DIR / f'train_step_{args.size}_{device.type}.json')
    torch.distributed.destroy_process_group()
    return report


if __name__ == '__main__':
    main()

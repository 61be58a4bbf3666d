"""What SkipAt saves, and where: SkipAt-ViT against the plain ViT of the same size over a grid of attention
kernels, token counts, precisions and modes, ratios measured interleaved in one run.

    python -m bench.skipat_saving                 # the whole CPU grid (about 25 minutes on 2 cores)
    python -m bench.skipat_saving --quick         # a smoke run: T/16 at 64 px, batch 1, one repeat
    python -m bench.skipat_saving --device cuda --dtypes bf16 --batch-infer 256 --batch-step 32

The grid: S/16 at 224 px (197 tokens), 384 px (577) and S/8 at 224 px (785); T/16 and B/16 at 224 px. Each
with both models computing attention (a) explicitly, as timm 0.5.4 did when SkipAt's paper was measured (the
N x N matrix and its softmax written to memory), and (b) fused (``F.scaled_dot_product_attention``, timm's
default), set through the config's ``model.attention``. Two modes: inference (the backbone, eval mode), and
the whole DINO step of the trainer (bench.train_step_throughput: student on 2 global crops at the grid's size
and ``--n-local`` 96 px crops at the same patch size, teacher on the globals, DINO head and loss, backward,
optimizer step, EMA). fp32, and bf16 where the device has bf16 arithmetic.

Beside each ratio: the multiply-accumulates per image, counted by torch's FLOP counter with explicit
attention (the same count either way; the counter is given the fused CPU kernel's formula), and the share of
a step's time spent in attention, in Phi and in the MLPs, timed by module hooks (forward, and backward in
the DINO step) in one extra step per model after the timed ones. The machine's load average is recorded:
on a shared machine the ratios hold (interleaved), the absolute rates less so.
"""

import argparse
import os
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, Iterator, List, NamedTuple, Sequence

import timm
import torch
from timm.layers import Attention, Mlp
from torch import nn

from bench.backbone_throughput import (
    RESULTS_DIR,
    VIT_VS_SKIPAT_KEYS,
    make_step,
    pick_device,
    run_header,
    write_json,
)
from bench.knn_throughput import cpu_bf16_flags
from bench.train_step_throughput import CONFIGS, build_step, init_process_group, model_flops_per_image, step_config
from skipssl.models import ATTENTION_KINDS, SkipAttentionPhi, count_macs
from skipssl.models.throughput import interleaved_rates, rate_report, synchronize
from skipssl.train.plan import build_student
from skipssl_common.io import atomic_write_json

MODELS = ('vit', 'skipat')  # the base first: ratios are skipat / vit
DTYPES = {'fp32': None, 'bf16': torch.bfloat16}
REGIONS = {'attention': Attention, 'phi': SkipAttentionPhi, 'mlp': Mlp}


class Geometry(NamedTuple):
    size: str  # tiny, small, base
    img_size: int  # global crops and inference
    patch_size: int

    @property
    def tokens(self) -> int:
        return (self.img_size // self.patch_size) ** 2 + 1

    @property
    def label(self) -> str:
        return f'{self.size[0].upper()}/{self.patch_size} {self.img_size}px'


# most telling first: a run cut short (the GPU suite's cap) keeps the 197-token comparison
GRID = (
    Geometry('small', 224, 16),
    Geometry('small', 384, 16),
    Geometry('small', 224, 8),
    Geometry('tiny', 224, 16),
    Geometry('base', 224, 16),
)
QUICK_GRID = (Geometry('tiny', 64, 16),)  # 17 tokens: the smallest grid Phi's 5x5 convolution runs on


def has_bf16(device: torch.device) -> bool:
    """bf16 arithmetic in hardware: CUDA from Ampere on; on x86 CPUs AVX512-BF16 or AMX (without them torch
    emulates bf16 matmuls, slower than fp32, which would measure the emulation rather than the models)."""
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported()
    return bool({'avx512_bf16', 'amx_bf16'} & set(cpu_bf16_flags()))


# -- where the time goes -------------------------------------------------------------------------------------
@contextmanager
def region_timer(modules: Sequence[nn.Module], device: torch.device) -> Iterator[Dict[str, float]]:
    """Seconds spent in each of REGIONS (forward and, where gradients flow, backward) while in the block.

    Module hooks, synchronised with the device, bracket every call; the regions never nest, and on CPU the
    autograd engine runs a module's backward in one stretch (its nodes are the newest ready ones), so the
    brackets hold only the region's own work."""
    seconds = {name: 0.0 for name in REGIONS}
    started: Dict[tuple, float] = {}
    handles = []

    def enter(key: tuple) -> None:
        synchronize(device)
        started[key] = time.perf_counter()

    def leave(key: tuple, region: str) -> None:
        synchronize(device)
        seconds[region] += time.perf_counter() - started.pop(key)

    for root in modules:
        for module in root.modules():
            region = next((name for name, cls in REGIONS.items() if isinstance(module, cls)), None)
            if region is None:
                continue
            fwd, bwd = (id(module), 'f'), (id(module), 'b')
            handles += [
                module.register_forward_pre_hook(lambda m, a, k=fwd: enter(k)),
                module.register_forward_hook(lambda m, a, o, k=fwd, r=region: leave(k, r)),
                module.register_full_backward_pre_hook(lambda m, g, k=bwd: enter(k)),
                module.register_full_backward_hook(lambda m, gi, go, k=bwd, r=region: leave(k, r)),
            ]
    try:
        yield seconds
    finally:
        for h in handles:
            h.remove()


def time_shares(run: Callable[[], None], modules: Sequence[nn.Module], device: torch.device) -> Dict[str, float]:
    """Share of one call of ``run`` in attention, Phi, the MLPs and the rest; and that call's seconds."""
    with region_timer(modules, device) as seconds:
        synchronize(device)
        t0 = time.perf_counter()
        run()
        synchronize(device)
        total = time.perf_counter() - t0
    shares = {name: s / total for name, s in seconds.items()}
    shares['rest'] = 1.0 - sum(shares.values())
    return dict(shares, profiled_step_s=total)


# -- the grid --------------------------------------------------------------------------------------------------
def step_args(args, geo: Geometry, dtype: str, batch_size: int) -> SimpleNamespace:
    """What bench.train_step_throughput's step builder takes, for one cell."""
    return SimpleNamespace(
        size=geo.size,
        precision=dtype,
        zero_stage=0,
        batch_size=batch_size,
        n_local=args.n_local,
        compile_model=False,
        global_size=geo.img_size,
        local_size=args.local_size,
        head_out_dim=args.head_out_dim,
    )


def model_overrides(geo: Geometry, attention: str) -> List[str]:
    return [f'model.kwargs.patch_size={geo.patch_size}', f'model.attention={attention}']


def count_geometry(args, geo: Geometry, device: torch.device) -> Dict:
    """MACs per image of each model, counted with explicit attention: inference (one forward at the grid's
    size) and the DINO step (model_flops_per_image / 2)."""
    out: Dict = {'infer': {}, 'dino_step': {}}
    for key in MODELS:
        cfg = step_config(key, step_args(args, geo, 'fp32', 1), device, model_overrides(geo, 'explicit'))
        student = build_student(cfg).to(device)
        out['infer'][key] = count_macs(student.backbone, (1, 3, geo.img_size, geo.img_size)) / 1e9
        flops = model_flops_per_image(student, geo.img_size, args.local_size, args.n_local, 3)
        out['dino_step'][key] = flops / 2 / 1e9
    return {
        'gmacs_per_image': out,
        'mac_saving': {mode: 1.0 - v['skipat'] / v['vit'] for mode, v in out.items()},
    }


def build_cell(args, geo: Geometry, attention: str, dtype: str, mode: str, device: torch.device):
    """Per model: (the step to time, the modules whose regions are timed)."""
    built = {}
    for key in MODELS:
        if mode == 'infer':
            cfg = step_config(key, step_args(args, geo, dtype, 1), device, model_overrides(geo, attention))
            torch.manual_seed(0)
            backbone = build_student(cfg).backbone.to(device)
            x = torch.randn(args.batch_infer, 3, geo.img_size, geo.img_size, device=device)
            built[key] = (make_step(backbone, x, 'infer', DTYPES[dtype], device), [backbone])
        else:
            bench = build_step(
                key, step_args(args, geo, dtype, args.batch_step), device, model_overrides(geo, attention)
            )
            built[key] = (bench.run, list(bench.backbones.values()))
    return built


def measure_cell(args, geo: Geometry, attention: str, dtype: str, mode: str, device: torch.device) -> Dict:
    built = build_cell(args, geo, attention, dtype, mode, device)
    batch = args.batch_infer if mode == 'infer' else args.batch_step
    steps = {key: run for key, (run, _) in built.items()}
    rates = interleaved_rates(steps, batch, args.iters, args.repeats, device, warmup=args.warmup)
    shares = {key: time_shares(run, modules, device) for key, (run, modules) in built.items()}
    return {
        'geometry': geo.label,
        'size': geo.size,
        'img_size': geo.img_size,
        'patch_size': geo.patch_size,
        'tokens': geo.tokens,
        'attention': attention,
        'dtype': dtype,
        'mode': mode,
        'batch_size': batch,
        **rate_report(rates, 'vit', 'skipat', VIT_VS_SKIPAT_KEYS),
        'time_share': shares,
        'load_average_1min': os.getloadavg()[0],
    }


def cells(args, device: torch.device):
    """(geometry, attention, dtype, mode) in the order they are measured: geometry by geometry (GRID's order), so
    that a run cut short keeps the most telling comparisons whole; the DINO step at the first geometry only
    unless ``--step-grid all``."""
    grid = QUICK_GRID if args.quick else tuple(g for g in GRID if g.size in args.sizes)
    for i, geo in enumerate(grid):
        for mode in args.modes:
            if mode == 'dino_step' and i > 0 and args.step_grid != 'all':
                continue
            for dtype in args.dtypes:
                for attention in args.attention:
                    yield geo, attention, dtype, mode


def run_grid(args, device: torch.device, report: Dict, save: Callable[[Dict], None]) -> Dict:
    """Measures every cell, counting each geometry's MACs before its first cell; ``save(report)`` after each."""
    counts: Dict[Geometry, Dict] = {}
    geometries = report.setdefault('geometries', [])
    results = report.setdefault('results', [])
    for geo, attention, dtype, mode in cells(args, device):
        if geo not in counts:
            counts[geo] = count_geometry(args, geo, device)
            geometries.append(
                dict(
                    geometry=geo.label,
                    size=geo.size,
                    img_size=geo.img_size,
                    patch_size=geo.patch_size,
                    tokens=geo.tokens,
                )
                | counts[geo]
            )
        t0 = time.perf_counter()
        cell = measure_cell(args, geo, attention, dtype, mode, device)
        macs_mode = 'infer' if mode == 'infer' else 'dino_step'
        cell['gmacs_per_image'] = counts[geo]['gmacs_per_image'][macs_mode]
        cell['mac_saving'] = counts[geo]['mac_saving'][macs_mode]
        cell['seconds'] = round(time.perf_counter() - t0, 1)
        results.append(cell)
        share = cell['time_share']
        print(
            f'  {mode:9s} {dtype} {geo.label:12s} {geo.tokens:4d} tok {attention:8s}  ratio '
            f'{cell["ratio_skipat_over_vit"]:.3f}x  MACs -{cell["mac_saving"]:.1%}  ViT attn '
            f'{share["vit"]["attention"]:.0%} mlp {share["vit"]["mlp"]:.0%}  SkipAt attn '
            f'{share["skipat"]["attention"]:.0%} phi {share["skipat"]["phi"]:.0%} mlp {share["skipat"]["mlp"]:.0%}'
            f'  ({cell["seconds"]:.0f} s, load {cell["load_average_1min"]:.1f})',
            flush=True,
        )
        save(report)
    return report


def parse_args(argv=None):
    """The command line with the device's defaults filled in: (args, device)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='auto', help='auto, cpu, cuda ...')
    p.add_argument('--quick', action='store_true', help='smoke run: T/16 at 64 px, 2 local crops, a small head')
    p.add_argument('--sizes', nargs='+', default=['tiny', 'small', 'base'], choices=['tiny', 'small', 'base'])
    p.add_argument('--modes', nargs='+', default=['infer', 'dino_step'], choices=['infer', 'dino_step'])
    p.add_argument('--attention', nargs='+', default=list(ATTENTION_KINDS), choices=list(ATTENTION_KINDS))
    p.add_argument('--dtypes', nargs='+', default=None, choices=list(DTYPES), help='default: fp32 and bf16 if fast')
    p.add_argument('--batch-infer', type=int, default=None, help='default: 4 on CPU, 256 on CUDA')
    p.add_argument('--batch-step', type=int, default=None, help='images per DINO step; default: 1 on CPU, 32 on CUDA')
    p.add_argument('--n-local', type=int, default=None, help='96 px crops per image (default 10, --quick 2)')
    p.add_argument('--local-size', type=int, default=None, help='local crops in px (default 96, --quick 32)')
    p.add_argument(
        '--step-grid',
        default=None,
        choices=['first', 'all'],
        help='geometries the DINO step is measured at: the first (S/16 at 224 px) or all; default: first on CPU '
        '(a whole step of the larger ones takes minutes on a small CPU), all on CUDA',
    )
    p.add_argument('--head-out-dim', type=int, default=None, help="DINO head prototypes (default: the config's)")
    p.add_argument('--repeats', type=int, default=None, help='default: 3 (--quick 1)')
    p.add_argument('--iters', type=int, default=None, help='steps per timing; default: 1 on CPU, 5 on CUDA')
    p.add_argument('--warmup', type=int, default=None, help='default: 1 on CPU (--quick 0), 2 on CUDA')
    p.add_argument('--threads', type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument('--out', type=Path, default=None, help='JSON (default: bench/results/skipat_saving_<device>.json)')
    args = p.parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == 'cuda'
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtypes is None:
        args.dtypes = (['bf16'] if cuda else ['fp32']) + (['bf16'] if has_bf16(device) and not cuda else [])
    args.batch_infer = args.batch_infer or (256 if cuda else 1 if args.quick else 4)
    args.batch_step = args.batch_step or (32 if cuda else 1)
    args.n_local = args.n_local if args.n_local is not None else (2 if args.quick else 10)
    args.local_size = args.local_size or (32 if args.quick else 96)
    args.step_grid = args.step_grid or ('all' if cuda else 'first')
    args.head_out_dim = args.head_out_dim or (1024 if args.quick else None)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.iters = args.iters or (5 if cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 0 if args.quick else 1)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return args, device


def header(args, device: torch.device) -> Dict:
    return {
        **run_header('skipat_saving', device),
        'timm': timm.__version__,
        'cpu_flags_bf16': cpu_bf16_flags(),
        'cpu_cores': os.cpu_count(),
        'threads': torch.get_num_threads(),
        'load_average_start': list(os.getloadavg()),
        'configs': CONFIGS,
        'settings': {
            'quick': args.quick,
            'modes': args.modes,
            'dtypes': args.dtypes,
            'attention': args.attention,
            'batch_infer': args.batch_infer,
            'batch_step': args.batch_step,
            'crops': {'global': 2, 'local': [args.n_local, args.local_size]},
            'step_grid': args.step_grid,
            'head_out_dim': args.head_out_dim or 'config',
            'repeats': args.repeats,
            'iters_per_repeat': args.iters,
            'warmup': args.warmup,
        },
    }


def main(argv=None) -> Dict:
    args, device = parse_args(argv)
    out = args.out or RESULTS_DIR / f'skipat_saving_{device.type}.json'
    if 'dino_step' in args.modes:
        init_process_group(device)
    report = header(args, device)
    print(f'SkipAt against ViT on {report["device"]}, load average {report["load_average_start"]}', flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    run_grid(args, device, report, lambda r: atomic_write_json(r, out, indent=2))  # after every cell
    report['load_average_end'] = list(os.getloadavg())
    write_json(report, out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return report


if __name__ == '__main__':
    main()

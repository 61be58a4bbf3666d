"""Throughput of SkipAt-ViT against the plain ViT of the same size, measured interleaved in one run.

    # CPU: fp32; CUDA: bf16, batch 256 and 1024, eager and compiled
    python -m bench.backbone_throughput
    python -m bench.backbone_throughput --size tiny --mode train --batch-sizes 64

Each repeat times both models back to back (order alternating), so drift of the machine hits both;
the reported ratio is the median of per-repeat ratios. Results go to bench/results/ as JSON.
"""

import argparse
import platform
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

import timm
import torch

import skipssl  # noqa: F401  (registers the SkipAt models)
from skipssl.models import count_macs, count_params
from skipssl.models.throughput import interleaved_rates, rate_report
from skipssl_common.io import atomic_write_json

RESULTS_DIR = Path(__file__).resolve().parent / 'results'
# what a SkipAt-against-ViT comparison reports (``rate_report``: ViT the base), here and in bench.train_step_throughput
VIT_VS_SKIPAT_KEYS = ('vit_img_per_s', 'skipat_img_per_s', 'ratio_skipat_over_vit', 'per_repeat_img_per_s')


def run_header(benchmark: str, device: torch.device) -> Dict:
    """The fields every benchmark report starts with: which benchmark, when, on what, with which torch."""
    return {
        'benchmark': benchmark,
        'date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'device': device_name(device),
        'device_type': device.type,
        'torch': torch.__version__,
    }


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return f'{line.split(":", 1)[1].strip()} ({torch.get_num_threads()} threads)'
    except OSError:
        pass
    return f'{platform.processor() or "cpu"} ({torch.get_num_threads()} threads)'


def build(name: str, device: torch.device, compile_model: bool, channels_last: bool) -> torch.nn.Module:
    model = timm.create_model(name, num_classes=0, dynamic_img_size=True).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile_model else model


def make_step(model, x, mode: str, amp_dtype: Optional[torch.dtype], device: torch.device):
    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()

    if mode == 'infer':
        model.eval()

        def step():
            with torch.inference_mode(), autocast():
                model(x)
    else:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            with autocast():
                loss = model(x).float().square().mean()
            loss.backward()
            for p in params:
                p.grad = None

    return step


def run_config(args, device, batch_size: int, compile_model: bool) -> Dict:
    amp_dtype = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[args.precision]
    names = {'vit': f'vit_{args.size}_patch16_224', 'skipat': f'vit_{args.size}_patch16_skipat_224'}
    x = torch.randn(batch_size, 3, args.img_size, args.img_size, device=device)
    steps = {}
    for key, name in names.items():
        torch.manual_seed(0)
        model = build(name, device, compile_model, args.channels_last)
        steps[key] = make_step(model, x, args.mode, amp_dtype, device)
    rates = interleaved_rates(steps, batch_size, args.iters, args.repeats, device, warmup=args.warmup)
    result = {
        'batch_size': batch_size,
        'compile': compile_model,
        **rate_report(rates, 'vit', 'skipat', VIT_VS_SKIPAT_KEYS),
    }
    print(
        f'  batch {batch_size:5d} compile={str(compile_model):5s}  ViT {result["vit_img_per_s"]:9.1f} img/s  '
        f'SkipAt {result["skipat_img_per_s"]:9.1f} img/s  ratio {result["ratio_skipat_over_vit"]:.3f}x',
        flush=True,
    )
    return result


def pick_device(spec: str) -> torch.device:
    """'auto' (CUDA when present, else CPU), or any torch device string."""
    if spec == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(spec)


def parse_args(argv=None):
    """The command line with the device's defaults filled in: (args, device). On CUDA also allows TF32 and
    cuDNN autotuning, as a training run would."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--size', default='small', choices=['tiny', 'small', 'base'])
    p.add_argument('--mode', default='infer', choices=['infer', 'train'], help='forward only, or forward+backward')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:1 ...')
    p.add_argument(
        '--precision',
        default=None,
        choices=['fp32', 'bf16', 'fp16'],
        help='default: bf16 autocast on CUDA, fp32 on CPU',
    )
    p.add_argument('--batch-sizes', type=int, nargs='+', default=None, help='default: 256 1024 on CUDA, 16 on CPU')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument(
        '--compile',
        default=None,
        choices=['off', 'on', 'both'],
        help='torch.compile the models; default: both on CUDA, off on CPU',
    )
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--repeats', type=int, default=None, help='default: 7 on CUDA, 3 on CPU')
    p.add_argument('--iters', type=int, default=None, help='steps per timing; default: 20 on CUDA, 2 on CPU')
    p.add_argument('--warmup', type=int, default=None, help='default: 5 on CUDA, 1 on CPU')
    p.add_argument('--out', type=Path, default=None, help='JSON path (default: bench/results/<name>.json)')
    args = p.parse_args(argv)

    device = pick_device(args.device)
    cuda = device.type == 'cuda'
    args.precision = args.precision or ('bf16' if cuda else 'fp32')
    args.batch_sizes = args.batch_sizes or ([256, 1024] if cuda else [16])
    args.compile = args.compile or ('both' if cuda else 'off')
    args.repeats = args.repeats or (7 if cuda else 3)
    args.iters = args.iters or (20 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return args, device


def compile_modes(choice: str) -> List[bool]:
    return {'off': [False], 'on': [True], 'both': [False, True]}[choice]


def header(args, device: torch.device) -> Dict:
    """What the run measures, on what, and the models' sizes (parameters, MACs per image)."""
    vit_name, skip_name = f'vit_{args.size}_patch16_224', f'vit_{args.size}_patch16_skipat_224'
    # dynamic_img_size as in build(): --img-size other than 224 is counted at that size
    vit_cpu = timm.create_model(vit_name, num_classes=0, dynamic_img_size=True)
    skip_cpu = timm.create_model(skip_name, num_classes=0, dynamic_img_size=True)
    img = (1, 3, args.img_size, args.img_size)
    return {
        **run_header('backbone_throughput', device),
        'timm': timm.__version__,
        'models': {'vit': vit_name, 'skipat': skip_name},
        'params': {'vit': count_params(vit_cpu), 'skipat': count_params(skip_cpu)},
        'gmacs_per_image': {'vit': count_macs(vit_cpu, img) / 1e9, 'skipat': count_macs(skip_cpu, img) / 1e9},
        'mode': args.mode,
        'precision': args.precision,
        'img_size': args.img_size,
        'channels_last': args.channels_last,
        'repeats': args.repeats,
        'iters_per_repeat': args.iters,
    }


def write_json(report: Dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(report, out, indent=2)
    print(f'wrote {out}')


def main(argv=None) -> Dict:
    args, device = parse_args(argv)
    head = header(args, device)
    print(f'{args.mode} throughput, {args.size} at {args.img_size}px, {args.precision}, on {head["device"]}')
    print(
        f'  params ViT {head["params"]["vit"] / 1e6:.2f}M  SkipAt {head["params"]["skipat"] / 1e6:.2f}M;  '
        f'GMACs ViT {head["gmacs_per_image"]["vit"]:.2f}  SkipAt {head["gmacs_per_image"]["skipat"]:.2f}'
    )
    results = [run_config(args, device, bs, c) for c in compile_modes(args.compile) for bs in args.batch_sizes]
    report = dict(head, results=results)
    write_json(report, args.out or RESULTS_DIR / f'backbone_{args.mode}_{args.size}_{device.type}.json')
    return report


if __name__ == '__main__':
    main()

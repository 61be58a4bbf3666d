"""The CKA command: CKA between the blocks of a checkpoint, an export or a random-init timm model, on image
shards, the skip choice it suggests and what that choice saves (SkipAt, section 3.2 and Fig. 3).

    skipssl-cka --checkpoint runs/vit_s --shards data/in1k/val --images 10000 --out cka/
    python -m skipssl_eval.cka ...   # the same

The estimator, the skip choice and the cost measurement are :mod:`skipssl.analysis.cka`'s; this module loads
what the evaluators load and writes ``cka.json``, the heat maps and the run's TensorBoard entries.
"""

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from skipssl.analysis.capture import block_kinds
from skipssl.analysis.cka import (
    MIN_BATCH,
    choose_skips,
    cost_of_skips,
    default_skips,
    measure,
    plot_matrix,
    skip_line,
    skip_variants,
)
from skipssl.data import EvalShards, eval_transform
from skipssl_common.io import atomic_write_json

from .cli import add_preprocessing_arguments, run
from .data import open_split
from .errors import EvalError
from .source import PIXELS, check_channels, data_settings, load_model, preprocessing_flags


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='skipssl-cka', description=__doc__.split('\n')[0])
    p.add_argument(
        '--checkpoint',
        required=True,
        help='run folder, checkpoint folder, .safetensors export or timm '
        'model name (random init), as the evaluators take it',
    )
    p.add_argument('--shards', required=True, help='image shards: folder, *-index.json, .txt list or brace pattern')
    p.add_argument('--prefix', help='shard prefix when the folder holds several indices (default: test/val)')
    p.add_argument('--images', type=int, default=None, help='images to analyse (default: all)')
    p.add_argument('--batch-size', type=int, default=64, help='minibatch of the unbiased HSIC (at least 4)')
    p.add_argument(
        '--skips', type=int, default=None, help='blocks to suggest skipping (default: half the depth, 6 of 12)'
    )
    p.add_argument(
        '--throughput-batch',
        type=int,
        default=None,
        help="batch at which the suggestion's images/s are measured, 0: not measured (default: 64 on a GPU, 8 on CPU)",
    )
    p.add_argument('--out', default='cka', help='output folder (default: ./cka)')
    p.add_argument('--which', default='teacher', choices=('teacher', 'student'))
    p.add_argument('--model-kwargs', type=json.loads, help='JSON kwargs of a random-init timm model')
    p.add_argument('--seed', type=int, default=0, help='random-init seed')
    p.add_argument('--num-workers', type=int, default=2)
    p.add_argument('--device', default='auto', help='auto (GPU when there is one), cpu or cuda')
    p.add_argument(
        '--precision',
        default='fp32',
        choices=('fp32', 'bf16'),
        help='forward precision (Grams and HSIC are float32/float64 either way)',
    )
    add_preprocessing_arguments(p)
    return p.parse_args(argv)


def check_options(args: argparse.Namespace) -> None:
    if args.batch_size < MIN_BATCH:
        raise EvalError(f'--batch-size {args.batch_size}: the unbiased HSIC needs at least {MIN_BATCH} images a batch')
    if args.images is not None and args.images < MIN_BATCH:
        raise EvalError(f'--images {args.images}: CKA needs at least {MIN_BATCH} images')
    if args.throughput_batch is not None and args.throughput_batch < 0:
        raise EvalError(f'--throughput-batch {args.throughput_batch} is negative')
    if args.num_workers < 0:
        raise EvalError(f'--num-workers {args.num_workers} is negative')
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EvalError(f'--out {out} exists and is not a folder')


def pick_device(name: str) -> torch.device:
    """The GPU when there is one (``auto``), else what was asked for; EvalError for a name torch does not know
    or a GPU that is not there."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError as exn:
        raise EvalError(f'--device {name}: not a device name (auto, cpu, cuda, cuda:N)') from exn
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise EvalError(f'--device {name} but no GPU is visible')
    return device


def analyse(args: argparse.Namespace) -> Dict[str, Any]:
    """The command: load, check everything cheap, measure, write cka.json and the heat maps, print the skips."""
    check_options(args)
    if args.checkpoint == PIXELS:
        raise EvalError('--checkpoint pixels has no blocks to analyse; give a ViT')
    module, info = load_model(args.checkpoint, which=args.which, seed=args.seed, model_kwargs=args.model_kwargs)
    try:
        depth = len(block_kinds(module))
    except ValueError as exn:
        raise EvalError(f'{args.checkpoint}: {exn}') from exn
    skips = default_skips(depth) if args.skips is None else args.skips
    if not 0 <= skips <= depth - 1:
        raise EvalError(
            f'--skips {skips}: {info.model_name} has {depth} blocks, so 0..{depth - 1} can be skipped (never block 0)'
        )
    data = data_settings(info, preprocessing_flags(args))
    check_channels(module, info, data['channels'])
    split = open_split(args.shards, 'test', args.prefix, require_labels=False)
    device = pick_device(args.device)
    if args.throughput_batch is None:
        args.throughput_batch = 64 if device.type == 'cuda' else 8

    dataset = EvalShards(
        split.urls,
        eval_transform(data['eval_resize'], data['eval_crop'], data['mean'], data['std']),
        channels=data['channels'],
        require_labels=False,
    )
    loader = DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=device.type == 'cuda'
    )
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    module = module.to(device).eval()
    try:
        result = measure(module, (images for images, _, _ in loader), device, args.images, args.precision, log)
    except ValueError as exn:
        raise EvalError(f'{args.shards}: {exn}') from exn

    input_size = (1, data['channels'], data['eval_crop'], data['eval_crop'])
    result.update(
        {
            'model': info.as_dict(),
            'shards': args.shards,
            'batch_size': args.batch_size,
            'estimator': 'minibatch unbiased HSIC_1 (Nguyen, Raghu, Kornblith 2021), linear kernel, per-image '
            'features flattened (tokens x dim)',
            'z_layers': list(range(depth)),
            'attention_layers': result['computed_blocks'],
            'suggestion': suggest(
                result['z'],
                skips,
                module,
                info.model_name,
                info.model_kwargs,
                input_size,
                device,
                args.throughput_batch,
                args.precision,
            ),
        }
    )
    write_outputs(result, Path(args.out), info.model_name)
    if info.run_dir:
        log_to_run(result, Path(args.out), Path(info.run_dir) / 'tb', info.iteration or 0)
    print_suggestion(result['suggestion'], result['images'])
    return result


def suggest(
    z: Sequence[Sequence[float]],
    skips: int,
    module: nn.Module,
    model_name: str,
    model_kwargs: Dict[str, Any],
    input_size: Tuple[int, ...],
    device: torch.device,
    throughput_batch: int = 0,
    precision: str = 'fp32',
) -> Dict[str, Any]:
    """The skip choice from the Z CKA matrix, each chosen block's CKA with the block its Phi would read, and
    what the choice saves: MACs per image and, when ``throughput_batch`` > 0, measured images/s."""
    chosen, score = choose_skips(z, skips)
    plain, skipped = skip_variants(module, model_name, model_kwargs, chosen)
    return {
        'skips': skips,
        'skip_indices': chosen,
        'score': score,
        'per_block': {str(j): z[j][max(i for i in range(j) if i not in chosen)] for j in chosen},
        **cost_of_skips(plain, skipped, input_size, device, throughput_batch, precision),
    }


def print_suggestion(suggestion: Dict[str, Any], images: int) -> None:
    """The config line to paste, between what it rests on and what it saves."""
    full, skipped = suggestion['macs_without_skips'], suggestion['macs_with_skips']
    print(
        f'CKA of {images} images; blocks to skip, each best predicted by the last computed block before it '
        f'(summed CKA {suggestion["score"]:.3f}):'
    )
    print(skip_line(suggestion['skip_indices']))
    print(
        f'MACs per image at {suggestion["input_size"][-1]} px: {full / 1e9:.4f} G -> {skipped / 1e9:.4f} G '
        f'({(full - skipped) / 1e9:.4f} G, {100.0 * (full - skipped) / full:.1f}% saved)'
    )
    if 'throughput' in suggestion:
        tp = suggestion['throughput']
        print(
            f'measured on {tp["device"]} ({tp["precision"]}, batch {tp["batch_size"]}): '
            f'{tp["img_per_s_without_skips"]:.1f} -> {tp["img_per_s_with_skips"]:.1f} img/s '
            f'({tp["speedup"]:.2f}x)'
        )


def without_nan(value: Any) -> Any:
    """``value`` with NaN floats (CKA of a constant representation) as None: strict JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(v) for v in value]
    return value


def write_outputs(result: Dict[str, Any], out: Path, model_name: str) -> None:
    """cka.json, cka_z.png, cka_attention.png (head-averaged) and cka_attention_head{h}.png."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(without_nan(result), out / 'cka.json', indent=1)
    n, skipped = result['images'], result['skipped_blocks']
    plot_matrix(
        result['z'],
        result['z_layers'],
        f'{model_name}\nCKA of MSA outputs Z, {n} images (* skipped block)',
        out / 'cka_z.png',
        skipped,
    )
    if result['attention_layers']:
        plot_matrix(
            result['attention_mean'],
            result['attention_layers'],
            f'{model_name}\nCKA of CLS attention, head-averaged, {n} images',
            out / 'cka_attention.png',
        )
        for h, matrix in enumerate(result['attention_heads']):
            plot_matrix(
                matrix,
                result['attention_layers'],
                f'{model_name}\nCKA of CLS attention, head {h}, {n} images',
                out / f'cka_attention_head{h}.png',
            )


def log_to_run(result: Dict[str, Any], out: Path, tb: Path, step: int) -> None:
    """Into a run's TensorBoard at the checkpoint's iteration: the heat maps as images and, as scalars, each
    block's Z CKA with the block before it and the suggestion's score."""
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tb), filename_suffix='.cka')
    try:
        for png in sorted(out.glob('cka_*.png')):
            with Image.open(png) as image:
                writer.add_image(f'analysis/{png.stem}', np.asarray(image.convert('RGB')), step, dataformats='HWC')
        z = result['z']
        for j in range(1, len(z)):
            if z[j][j - 1] is not None and not math.isnan(z[j][j - 1]):
                writer.add_scalar(f'analysis/cka_z_previous_block/{j}', z[j][j - 1], step)
        writer.add_scalar('analysis/cka_skip_score', result['suggestion']['score'], step)
    finally:
        writer.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    return run('skipssl-cka', analyse, {'args': args})


if __name__ == '__main__':
    sys.exit(main())

"""Centred kernel alignment (CKA) between the blocks of a ViT, streamed over minibatches, and the skip choice
it suggests (SkipAt, section 3.2 and Fig. 3).

Estimator (Nguyen, Raghu, Kornblith, ICLR 2021): per minibatch of n images, the unbiased HSIC_1 of Song et al.
(2012) between the linear-kernel Gram matrices K = X X^T of every pair of layers; the sums over minibatches give
CKA = sum HSIC(K, L) / sqrt(sum HSIC(K, K) * sum HSIC(L, L)). Only (layers, n, n) Grams exist per batch and the
(layers, layers) sums stay on the device, so memory does not grow with the number of images.

    python -m skipssl.analysis.cka --checkpoint runs/vit_s --shards data/in1k/val --images 10000 --out cka/
"""

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .capture import SKIPPED, BlockCapture

MIN_BATCH = 4  # the unbiased HSIC divides by n (n - 3)


# -- estimator ------------------------------------------------------------------------------------------
def unbiased_hsic(grams: torch.Tensor) -> torch.Tensor:
    """(L, L) unbiased HSIC_1 of every pair of the (L, n, n) Gram matrices, in float64.

    HSIC_1(K, L) = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)), K~ = K with zero
    diagonal. For all pairs at once: tr(K~_i L~_j) is a dot product of the flattened (symmetric) matrices and
    1'K~_i K~_j 1 one of their row sums, so the whole (L, L) matrix is two small matrix products.
    """
    L, n, _ = grams.shape
    if n < MIN_BATCH:
        raise ValueError(f'the unbiased HSIC needs at least {MIN_BATCH} samples per batch, got {n}')
    k = grams.double().clone()
    k.diagonal(dim1=1, dim2=2).zero_()
    flat = k.reshape(L, n * n)
    trace = flat @ flat.T
    rows = k.sum(2)  # (L, n): K~ 1
    totals = rows.sum(1)  # (L,):   1'K~1
    return (trace + torch.outer(totals, totals) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rows @ rows.T)) / (n * (n - 3))


def cka_from_hsic(hsic: torch.Tensor) -> torch.Tensor:
    """CKA matrix from summed HSIC: hsic / sqrt(diag diag^T); NaN where a representation has zero HSIC."""
    diag = hsic.diagonal().clamp_min(0)
    denom = torch.sqrt(torch.outer(diag, diag))
    return torch.where(denom > 0, hsic / denom, torch.full_like(hsic, float('nan')))


class StreamingCKA:
    """Sums of minibatch unbiased HSIC for every pair of L representations; on the device of the Grams."""

    def __init__(self) -> None:
        self.hsic: Optional[torch.Tensor] = None
        self.images = 0
        self.batches = 0

    def update(self, grams: torch.Tensor) -> None:
        """Add one minibatch: (L, n, n) Grams of the same n images. No host synchronisation."""
        h = unbiased_hsic(grams)
        self.hsic = h if self.hsic is None else self.hsic + h
        self.images += grams.shape[1]
        self.batches += 1

    def cka(self) -> torch.Tensor:
        if self.hsic is None:
            raise ValueError('no minibatch was added')
        return cka_from_hsic(self.hsic)


# -- skip selection -------------------------------------------------------------------------------------
def choose_skips(cka: Sequence[Sequence[float]], k: int) -> Tuple[List[int], float]:
    """(the k blocks to skip, their summed score): exact maximum of sum over skipped j of CKA(Z_j, Z_p(j)),
    p(j) being the last block before j that is not skipped (the one whose Z the skipped block's Phi reads).

    The score of a block depends on which earlier blocks are skipped, so a greedy pick can be wrong; a dynamic
    programme over (block, last computed block, skips so far) is exact in O(depth^2 k). Block 0 is never
    skipped (nothing before it to reuse).
    """
    m = [[float(v) for v in row] for row in cka]
    depth = len(m)
    if not 0 <= k <= depth - 1:
        raise ValueError(f'--skips {k}: a model of {depth} blocks can skip 0..{depth - 1} (never block 0)')
    neg = -math.inf
    # best[(last, s)] = (score, skipped) after the blocks seen so far, last computed block `last`, s skips
    best: Dict[Tuple[int, int], Tuple[float, Tuple[int, ...]]] = {(0, 0): (0.0, ())}
    for j in range(1, depth):
        nxt: Dict[Tuple[int, int], Tuple[float, Tuple[int, ...]]] = {}
        for (last, s), (score, skipped) in best.items():
            options = [((j, s), score, skipped)]  # compute block j
            if s < k:
                value = m[j][last]
                value = neg if math.isnan(value) else value
                options.append(((last, s + 1), score + value, skipped + (j,)))
            for key, sc, sk in options:
                if key not in nxt or sc > nxt[key][0]:
                    nxt[key] = (sc, sk)
        best = nxt
    score, skipped = max((v for (_, s), v in best.items() if s == k), key=lambda v: v[0])
    return list(skipped), score


def skip_variants(
    model: nn.Module, model_name: str, model_kwargs: Dict[str, Any], skips: Sequence[int]
) -> Tuple[nn.Module, nn.Module]:
    """(the model's architecture without any skip, with ``skips``), rebuilt with random weights: what they cost
    does not depend on the weights."""
    from skipssl.checkpoint import build_backbone
    from skipssl.models import convert_to_skipat

    kwargs = {key: v for key, v in model_kwargs.items() if key != 'skip_indices'}
    if hasattr(model, 'skip_indices'):  # a SkipAt model: the same name with other skip indices
        plain = build_backbone(model_name, {**kwargs, 'skip_indices': ()}).eval()
        skipped = build_backbone(model_name, {**kwargs, 'skip_indices': tuple(skips)}).eval()
    else:  # a timm ViT: converted
        plain = build_backbone(model_name, kwargs).eval()
        skipped = convert_to_skipat(plain, skips) if skips else plain
    return plain, skipped


def cost_of_skips(
    plain: nn.Module,
    skipped: nn.Module,
    input_size: Tuple[int, ...],
    device: torch.device,
    batch_size: int,
    precision: str = 'fp32',
    repeats: int = 3,
) -> Dict[str, Any]:
    """MACs per image (torch's FLOP counter) and inference images/s measured interleaved on ``device`` at
    ``batch_size`` (0: not timed) of the two variants, and the ratio of their rates."""
    from skipssl.models import count_macs
    from skipssl.models.throughput import interleaved_rates, rate_report

    cost: Dict[str, Any] = {
        'macs_without_skips': count_macs(plain, input_size),
        'macs_with_skips': count_macs(skipped, input_size),
        'input_size': list(input_size[1:]),
    }
    if batch_size <= 0:
        return cost
    x = torch.randn((batch_size,) + tuple(input_size[1:]), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == 'bf16' else nullcontext()

    def forward(model: nn.Module):
        def step() -> None:
            with torch.inference_mode(), autocast:
                model(x)

        return step

    models = {'without_skips': plain.to(device), 'with_skips': skipped.to(device)}
    rates = interleaved_rates(
        {k: forward(m) for k, m in models.items()},
        batch_size,
        iters=2 if device.type == 'cpu' else 10,
        repeats=repeats,
        device=device,
    )
    cost['throughput'] = {
        'device': str(device),
        'precision': precision,
        'batch_size': batch_size,
        **rate_report(
            rates,
            'without_skips',
            'with_skips',
            ('img_per_s_without_skips', 'img_per_s_with_skips', 'speedup', 'per_repeat'),
        ),
    }
    return cost


# -- measurement ----------------------------------------------------------------------------------------
def measure(
    model: nn.Module, batches, device: torch.device, max_images: Optional[int] = None, precision: str = 'fp32', log=None
) -> Dict[str, Any]:
    """Stream ``batches`` (image tensors) through ``model``; CKA of Z over all blocks, of the CLS attention
    (per head and head-averaged) over the computed blocks. Batches are cut to ``max_images`` in total; a last
    batch under 4 images is left out (the estimator needs 4)."""
    capture = BlockCapture(model)
    depth = len(capture.kinds)
    computed = [i for i, kind in enumerate(capture.kinds) if kind != SKIPPED]
    z_stream, attn_stream = StreamingCKA(), StreamingCKA()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == 'bf16' else nullcontext()
    seen, start = 0, time.time()
    with capture, torch.inference_mode():
        for images in batches:
            if max_images is not None:
                images = images[: max_images - seen]
            if images.shape[0] < MIN_BATCH:
                break
            capture.clear()
            with autocast:
                model.forward_features(images.to(device, non_blocking=True))
            z_stream.update(capture.stacked(capture.z_grams, list(range(depth))))
            if computed:
                attn = capture.stacked(capture.attn_grams, computed)  # (C, heads + 1, n, n)
                attn_stream.update(attn.transpose(0, 1).reshape(-1, *attn.shape[2:]))
            seen += images.shape[0]
            if log and z_stream.batches % 20 == 0:
                log(f'{seen} images, {seen / (time.time() - start):.0f} img/s')
            if max_images is not None and seen >= max_images:
                break
    if z_stream.batches == 0:
        raise ValueError(f'no batch of at least {MIN_BATCH} images was read')
    heads = capture.attn_grams[computed[0]].shape[0] - 1 if computed else 0
    attn_cka = attn_stream.cka().reshape(heads + 1, len(computed), heads + 1, len(computed)) if computed else None
    return {
        'images': seen,
        'batches': z_stream.batches,
        'depth': depth,
        'computed_blocks': computed,
        'skipped_blocks': [i for i in range(depth) if i not in computed],
        'z': z_stream.cka().cpu().tolist(),
        'attention_heads': [attn_cka[h, :, h].cpu().tolist() for h in range(heads)] if computed else [],
        'attention_mean': attn_cka[heads, :, heads].cpu().tolist() if computed else [],
    }


# -- outputs --------------------------------------------------------------------------------------------
def plot_matrix(
    matrix: Sequence[Sequence[float]], labels: Sequence[int], title: str, path: Path, skipped: Sequence[int] = ()
) -> None:
    """A layer x layer heat map with the values written in the cells, like the paper's Fig. 3; skipped blocks'
    labels are marked with '*'."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array(matrix, dtype=float)
    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.6 * n), max(4.5, 1.0 + 0.6 * n)))
    im = ax.imshow(values, vmin=0, vmax=1, cmap='viridis', origin='lower')
    names = [f'{i}*' if i in skipped else str(i) for i in labels]
    ax.set_xticks(range(n), names)
    ax.set_yticks(range(n), names)
    ax.set_xlabel('block')
    ax.set_ylabel('block')
    for r in range(n):
        for c in range(n):
            if not np.isnan(values[r, c]):
                ax.text(
                    c,
                    r,
                    f'{values[r, c]:.2f}',
                    ha='center',
                    va='center',
                    fontsize=7,
                    color='black' if values[r, c] > 0.6 else 'white',
                )
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def skip_line(skips: Sequence[int]) -> str:
    """The config override that applies the suggestion."""
    return f'model.kwargs.skip_indices=[{",".join(str(i) for i in skips)}]'


def default_skips(depth: int) -> int:
    """SkipAt skips 6 of 12 blocks: half of the blocks, never block 0."""
    return min(depth // 2, depth - 1)


# -- command --------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m skipssl.analysis.cka', description=__doc__.split('\n')[0])
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
    g = p.add_argument_group('preprocessing (default: what the checkpoint says, else ImageNet 256/224)')
    g.add_argument('--channels', type=int)
    g.add_argument('--resize', type=int)
    g.add_argument('--crop', type=int)
    g.add_argument('--mean', type=float, nargs='+')
    g.add_argument('--std', type=float, nargs='+')
    return p.parse_args(argv)


def check_options(args: argparse.Namespace) -> None:
    from eval.errors import EvalError

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
    from eval.errors import EvalError

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
    from torch.utils.data import DataLoader

    from eval.data import open_split
    from eval.errors import EvalError
    from eval.source import PIXELS, check_channels, data_settings, load_model, preprocessing_flags
    from skipssl.data import EvalShards, eval_transform

    from .capture import block_kinds

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
    from skipssl_common.io import atomic_write_json

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
    from eval.cli import run

    args = parse_args(argv)
    return run('skipssl.analysis.cka', analyse, {'args': args})


if __name__ == '__main__':
    sys.exit(main())

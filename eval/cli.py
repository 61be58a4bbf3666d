"""Command-line options both evaluators share, and the error handling of their entry points."""

import argparse
import json
import logging
import sys
from typing import Callable, Dict, Optional, Tuple

from skipssl.checkpoint import CheckpointError
from skipssl.failure import active_watch

from .errors import EvalError

EXAMPLES = """
model (--checkpoint): a run folder (its newest complete checkpoint, teacher backbone), a checkpoint folder
ckpt-XXXXXXXX, an exported backbone .safetensors, a timm model name (random init: a baseline; with --run-dir),
or 'pixels' (raw pixels as features). Under torchrun each rank extracts a disjoint part of the shards.
"""


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        '--checkpoint',
        required=True,
        help='run folder, checkpoint folder, .safetensors export, timm model name (random init) or "pixels"',
    )
    p.add_argument(
        '--train-shards',
        required=True,
        help='labelled training shards: folder, *-index.json, .txt list or brace pattern',
    )
    p.add_argument('--test-shards', required=True, help='labelled test shards (ImageNet: val)')
    p.add_argument('--train-prefix', help='shard prefix when the train folder holds several indices')
    p.add_argument('--test-prefix', help='shard prefix when the test folder holds several indices')
    p.add_argument('--dataset', help="dataset name in result files (default: the test shards' folder name)")
    p.add_argument(
        '--which',
        default='teacher',
        choices=('teacher', 'student'),
        help='backbone of a training checkpoint (default: teacher)',
    )
    p.add_argument(
        '--all-exports',
        action='store_true',
        help='evaluate every per-epoch export of the run folder (one point per epoch in the report)',
    )
    p.add_argument('--arch', help='expected model name: refuse a checkpoint of another architecture')
    p.add_argument(
        '--model-kwargs',
        type=json.loads,
        help="JSON kwargs of a random-init timm model (default: the run's, with --run-dir)",
    )
    p.add_argument('--seed', type=int, default=0, help='random-init seed; linear probe seed')
    p.add_argument(
        '--run-dir',
        help="run the results belong to (default: the checkpoint's run): results in RUN/eval, TensorBoard in RUN/tb",
    )
    p.add_argument('--out-dir', help='result folder (default: RUN/eval)')
    p.add_argument('--cache-dir', help='feature cache folder (default: RESULTS/features)')
    p.add_argument('--refresh', action='store_true', help='extract again even if cached')
    p.add_argument('--batch-size', type=int, default=128, help='extraction batch per rank')
    p.add_argument('--num-workers', type=int, default=2, help='data-loader workers per rank')
    p.add_argument(
        '--n-last-blocks',
        type=int,
        default=4,
        help='CLS tokens of the last N blocks are cached (linear-probe features; k-NN uses the last)',
    )
    p.add_argument(
        '--precision',
        default='auto',
        choices=('auto', 'fp32', 'bf16'),
        help='extraction precision (auto: bf16 autocast on GPU, fp32 on CPU)',
    )
    p.add_argument('--device', default='auto', help='auto, cpu or cuda')
    p.add_argument(
        '--allow-pipe-shards',
        action='store_true',
        help="accept 'pipe:' shard specs (also in .txt lists): each runs as a shell command",
    )
    add_preprocessing_arguments(p)


def add_preprocessing_arguments(p: argparse.ArgumentParser) -> None:
    """--channels, --resize, --crop, --mean, --std: what ``source.preprocessing_flags`` reads back."""
    g = p.add_argument_group('preprocessing (default: what the checkpoint says, else ImageNet 256/224)')
    g.add_argument('--channels', type=int)
    g.add_argument('--resize', type=int, help='shorter side before the centre crop')
    g.add_argument('--crop', type=int)
    g.add_argument('--mean', type=float, nargs='+')
    g.add_argument('--std', type=float, nargs='+')


def run(prog: str, fn: Callable, kwargs: Dict) -> int:
    """Call ``fn(**kwargs)``; bad input is one line on stderr and exit status 2, not a traceback."""
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    logging.getLogger('faiss.loader').setLevel(logging.WARNING)  # which SIMD build it tried, at INFO
    try:
        fn(**kwargs)
    except BaseException as exn:
        watch = active_watch()
        if watch is not None:  # other ranks wait in a collective for this one: end the whole job now
            watch.fail(exn, _describe)
        status, line = _describe(exn)
        if line is None:
            raise
        print(f'{prog}: {line}', file=sys.stderr)
        return status
    return 0


def _describe(exn: BaseException) -> Tuple[int, Optional[str]]:
    if isinstance(exn, (EvalError, CheckpointError)):
        return 2, f'error: {exn}'
    return 1, None

#!/usr/bin/env python
"""DINO's linear evaluation of a checkpoint, an exported backbone or a random-init baseline.

    # on cached centre-crop features (default; seconds to minutes), a learning-rate sweep chosen on 10% of train
    python linear_probe.py --checkpoint runs/dino_fmnist_tiny --train-shards data/fmnist/train-index.json \\
        --test-shards data/fmnist/test-index.json --sweep
    # DINO's protocol: RandomResizedCrop + flip through the frozen backbone every epoch
    torchrun --nproc_per_node 8 linear_probe.py --augment --checkpoint runs/vit_s \\
        --train-shards /data/in1k/train --test-shards /data/in1k/val
"""
import argparse
import sys

from eval.cli import EXAMPLES, add_common_arguments, run
from eval.linear import DEFAULT_BASE_LR, DEFAULT_BATCH, DEFAULT_EPOCHS
from eval.pipeline import run_linear


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='linear_probe.py', description=__doc__.split('\n')[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p)
    p.add_argument('--lrs', type=float, nargs='+', default=[DEFAULT_BASE_LR],
                   help='base learning rates (x batch / 256), trained side by side')
    p.add_argument('--sweep', action='store_true', help='base lrs 1e-4 ... 1e-1, best on held-out training data')
    p.add_argument('--epochs', type=int, default=DEFAULT_EPOCHS)
    p.add_argument('--linear-batch-size', type=int, default=DEFAULT_BATCH, help='global batch of the classifier')
    p.add_argument('--val-fraction', type=float, help='held-out part of train for choosing the lr (sweep: 0.1)')
    p.add_argument('--val-shards', help='held-out labelled shards instead (needed for a sweep with --augment)')
    p.add_argument('--augment', action='store_true',
                   help="DINO's protocol: augmented images through the frozen backbone every epoch")
    return run(p.prog, run_linear, vars(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

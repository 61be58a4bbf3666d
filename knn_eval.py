#!/usr/bin/env python
"""DINO's weighted k-NN evaluation (faiss) of a checkpoint, an exported backbone or a random-init baseline.

    python knn_eval.py --checkpoint runs/dino_fmnist_tiny --train-shards data/fmnist/train-index.json \\
        --test-shards data/fmnist/test-index.json
    torchrun --nproc_per_node 8 knn_eval.py --checkpoint runs/vit_s --all-exports \\
        --train-shards /data/in1k/train --test-shards /data/in1k/val
"""
import argparse
import sys

from eval.cli import EXAMPLES, add_common_arguments, run
from eval.knn import DEFAULT_KS, DEFAULT_TEMPERATURE
from eval.pipeline import run_knn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='knn_eval.py', description=__doc__.split('\n')[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p)
    p.add_argument('--k', type=int, nargs='+', default=list(DEFAULT_KS), dest='ks', help='k values, one search')
    p.add_argument('--temperature', type=float, default=DEFAULT_TEMPERATURE, help='vote weight exp(sim / T)')
    p.add_argument('--query-batch', type=int, default=8192, help='queries per faiss search (bounds memory)')
    p.add_argument('--faiss-gpu', default='auto', choices=('auto', 'yes', 'no'),
                   help='GPU index where faiss has GPU support (auto)')
    p.add_argument('--shortlist', type=float, default=0,
                   help='search through a bf16 GEMM shortlist of this many x k candidates re-scored in float32: '
                        'the same neighbours, faster on AMX / AVX512-BF16 CPUs and GPUs (0: exact search only)')
    return run(p.prog, run_knn, vars(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

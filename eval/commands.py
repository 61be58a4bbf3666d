"""The evaluators' commands: ``knn_eval.py`` / ``skipssl-knn`` and ``linear_probe.py`` / ``skipssl-linear``.

They live in the package so that the root scripts, the console scripts and launch's jobs call one ``main``.
"""

import argparse
import os
import sys
from typing import List, Optional

from .cli import EXAMPLES, add_common_arguments, run
from .knn import DEFAULT_KS, DEFAULT_TEMPERATURE
from .linear import DEFAULT_BASE_LR, DEFAULT_BATCH, DEFAULT_EPOCHS
from .pipeline import run_knn, run_linear

KNN_DOC = "DINO's weighted k-NN evaluation (faiss) of a checkpoint, an exported backbone or a random-init baseline."
LINEAR_DOC = "DINO's linear evaluation of a checkpoint, an exported backbone or a random-init baseline."


def _prog(script: str) -> str:
    """The name errors are reported under: the console script's when run as one, else the root script's."""
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ''
    return invoked if invoked.startswith('skipssl-') else script


def _parser(prog: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=doc, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(p)
    return p


def knn_main(argv: Optional[List[str]] = None) -> int:
    p = _parser(_prog('knn_eval.py'), KNN_DOC)
    p.add_argument('--k', type=int, nargs='+', default=list(DEFAULT_KS), dest='ks', help='k values, one search')
    p.add_argument('--temperature', type=float, default=DEFAULT_TEMPERATURE, help='vote weight exp(sim / T)')
    p.add_argument('--query-batch', type=int, default=8192, help='queries per faiss search (bounds memory)')
    p.add_argument(
        '--faiss-gpu',
        default='auto',
        choices=('auto', 'yes', 'no'),
        help='GPU index where faiss has GPU support (auto)',
    )
    p.add_argument(
        '--shortlist',
        type=float,
        default=0,
        help='search through a bf16 GEMM shortlist of this many x k candidates re-scored in float32: '
        'the same neighbours, faster on AMX / AVX512-BF16 CPUs and GPUs (0: exact search only)',
    )
    return run(p.prog, run_knn, vars(p.parse_args(argv)))


def linear_main(argv: Optional[List[str]] = None) -> int:
    p = _parser(_prog('linear_probe.py'), LINEAR_DOC)
    p.add_argument(
        '--lrs',
        type=float,
        nargs='+',
        default=[DEFAULT_BASE_LR],
        help='base learning rates (x batch / 256), trained side by side',
    )
    p.add_argument('--sweep', action='store_true', help='base lrs 1e-4 ... 1e-1, best on held-out training data')
    p.add_argument('--epochs', type=int, default=DEFAULT_EPOCHS)
    p.add_argument('--linear-batch-size', type=int, default=DEFAULT_BATCH, help='global batch of the classifier')
    p.add_argument('--val-fraction', type=float, help='held-out part of train for choosing the lr (sweep: 0.1)')
    p.add_argument('--val-shards', help='held-out labelled shards instead (needed for a sweep with --augment)')
    p.add_argument(
        '--augment',
        action='store_true',
        help="DINO's protocol: augmented images through the frozen backbone every epoch",
    )
    return run(p.prog, run_linear, vars(p.parse_args(argv)))

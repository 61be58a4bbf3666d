"""k-NN time and peak memory at ImageNet size: 1,281,167 x 384 training features against 50,000 queries.

    python -m bench.knn_throughput                                  # ImageNet size -> bench/results/knn_*.json
    python -m bench.knn_throughput --n-train 100000 --n-test 5000   # a quick look
    python -m bench.knn_throughput --shortlist 4 --exact-queries 5000  # bf16 shortlist vs exact on 5000 queries

With ``--shortlist S`` the same features are searched twice, each in its own process: exactly (faiss's flat
index) and through the bf16 shortlist of S x k candidates re-scored in float32 (eval/knn_shortlist.py); the JSON
records both times, their ratio, how many queries fell back to the exact index and how many top-1 predictions
agree (every k). ``--exact-queries M`` times the exact search on the first M queries only and extrapolates
linearly to all of them (said so in the JSON); agreement is then counted on those M queries.

Phase 1 writes synthetic clustered features (1000 classes) as two feature-cache files, the format knn_eval.py
reads. Phase 2 runs in a fresh process exactly what knn_eval.py runs on them (exact inner-product faiss index
filled chunk by chunk from the cache, queries in batches, k in {10, 20, 100, 200} from one search), so its
peak resident memory is the k-NN's own. The machine's load average is recorded: on a shared machine it
explains slow runs.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / 'results'


def cpu_name() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'cpu'


def cpu_bf16_flags() -> list:
    """The CPU's bfloat16 / int8 matrix features (what makes the bf16 shortlist fast), from /proc/cpuinfo."""
    try:
        flags = next(line for line in Path('/proc/cpuinfo').read_text().splitlines() if line.startswith('flags'))
    except (OSError, StopIteration):
        return []
    return sorted(set(flags.split()) & {'avx512_bf16', 'amx_bf16', 'amx_tile', 'amx_int8', 'avx512_vnni'})


def write_features(folder: Path, n_train: int, n_test: int, dim: int, classes: int, seed: int = 0) -> None:
    import torch

    from skipssl_eval.features import FEATURES_FORMAT, save_features

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    for role, n in (('train', n_train), ('test', n_test)):
        labels = rng.integers(classes, size=n)
        feats = np.empty((n, dim), np.float32)
        for start in range(0, n, 1 << 16):  # chunks: no float64 copy of the whole matrix
            stop = min(start + (1 << 16), n)
            noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * (3.0 / np.sqrt(dim))
            feats[start:stop] = centers[labels[start:stop]] + noise  # noise 3x the centre norm: not trivial
        save_features(
            folder / f'{role}.safetensors',
            torch.from_numpy(feats),
            torch.from_numpy(labels),
            [f'{role}_{i:08d}' for i in range(n)],
            {'format': FEATURES_FORMAT, 'knn_dim': dim, 'num_classes': classes, 'role': role},
        )


def resident_gib() -> float:
    """Current resident memory of this process (Linux /proc)."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 2**20
    return float('nan')


def search_phase(
    folder: Path, ks, query_batch: int, shortlist: int = 0, n_queries: int = 0, predictions: str = ''
) -> dict:
    """What knn_eval.py runs after extraction (on the first ``n_queries`` queries if given); returns timings and
    this process's peak RSS, and saves the top-1 prediction of every k to ``predictions`` (.npz) if given."""
    import faiss  # noqa: F401  (its import is not the k-NN's memory)
    import torch  # noqa: F401  (likewise)

    from skipssl_eval.features import FeatureFile
    from skipssl_eval.knn import Rows, knn_classify

    train, test = FeatureFile(folder / 'train.safetensors'), FeatureFile(folder / 'test.safetensors')
    test_rows, test_labels = test.knn_rows(), np.asarray(test.labels)
    if n_queries:
        test_rows = Rows(min(n_queries, test_rows.num), test_rows.dim, test_rows.read)
        test_labels = test_labels[: test_rows.num]
    baseline_gib = resident_gib()
    t0 = time.perf_counter()
    res = knn_classify(
        train.knn_rows(),
        train.labels,
        test_rows,
        test_labels,
        ks,
        num_classes=train.num_classes,
        query_batch=query_batch,
        keep_predictions=bool(predictions),
        gpu='no',
        shortlist=shortlist,
    )
    total = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if predictions:
        np.savez(predictions, **{str(k): p[:, 0] for k, p in res.predictions.items()})
    return {
        'seconds': {**res.seconds, 'total': round(total, 3)},
        'peak_rss_gib': round(peak_kib / 2**20, 3),
        'rss_before_search_gib': round(baseline_gib, 3),
        'n_queries': test_rows.num,
        'top1': res.summary()['top1'],
        'backend': res.backend,
        'fallbacks': res.fallbacks,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--n-train', type=int, default=1_281_167)
    p.add_argument('--n-test', type=int, default=50_000)
    p.add_argument('--dim', type=int, default=384)
    p.add_argument('--classes', type=int, default=1000)
    p.add_argument('--k', type=int, nargs='+', default=[10, 20, 100, 200])
    p.add_argument('--query-batch', type=int, default=8192)
    p.add_argument('--work-dir', help='where the synthetic feature files go (default: a temporary folder)')
    p.add_argument('--out', help='result JSON (default: bench/results/knn_<n_train>_cpu.json)')
    p.add_argument(
        '--shortlist',
        type=float,
        default=0,
        help='also search through a bf16 shortlist of this many x k candidates and compare (0: exact only)',
    )
    p.add_argument(
        '--exact-queries',
        type=int,
        default=0,
        help='time the exact search on this many queries and extrapolate (0: all)',
    )
    p.add_argument('--search-only', help=argparse.SUPPRESS)  # phase 2, in its own process
    p.add_argument('--n-queries', type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument('--predictions', default='', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.search_only:
        print(
            json.dumps(
                search_phase(
                    Path(args.search_only), args.k, args.query_batch, args.shortlist, args.n_queries, args.predictions
                )
            )
        )
        return 0
    if (args.shortlist and args.shortlist <= 1) or not 0 <= args.exact_queries <= args.n_test:
        p.error(f'--shortlist must be 0 or above 1 and --exact-queries within 0..{args.n_test}')

    import faiss

    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        t0 = time.perf_counter()
        write_features(Path(tmp), args.n_train, args.n_test, args.dim, args.classes)
        print(f'synthetic features written in {time.perf_counter() - t0:.0f} s', file=sys.stderr)

        def phase(shortlist: int, n_queries: int) -> dict:
            out = subprocess.run(
                [
                    sys.executable,
                    '-m',
                    'bench.knn_throughput',
                    '--search-only',
                    tmp,
                    '--k',
                    *map(str, args.k),
                    '--query-batch',
                    str(args.query_batch),
                    '--shortlist',
                    str(shortlist),
                    '--n-queries',
                    str(n_queries),
                    '--predictions',
                    f'{tmp}/pred{shortlist}.npz' if args.shortlist else '',
                ],
                check=True,
                capture_output=True,
                text=True,
                cwd=Path(__file__).resolve().parents[1],
            )
            return json.loads(out.stdout.strip().splitlines()[-1])

        load_before = os.getloadavg()
        got = phase(0, args.exact_queries)
        if args.shortlist:
            fast = phase(args.shortlist, 0)
            exact_pred, fast_pred = np.load(f'{tmp}/pred0.npz'), np.load(f'{tmp}/pred{args.shortlist}.npz')
            m = got['n_queries']
            agree = {k: int((exact_pred[k] == fast_pred[k][:m]).sum()) for k in exact_pred.files}
        load_after = os.getloadavg()
    scale = args.n_test / got['n_queries']  # linear extrapolation when the exact search ran on a subset
    if scale != 1:
        got['seconds_measured'] = got['seconds']
        got['seconds'] = {
            key: round(v * scale, 3) if key in ('search', 'vote') else v for key, v in got['seconds'].items()
        }
        got['seconds']['total'] = round(sum(v for key, v in got['seconds'].items() if key != 'total'), 3)
    flops = 2.0 * args.n_train * args.n_test * args.dim
    result = {
        'benchmark': 'knn_throughput',
        'date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'device': f'{cpu_name()} ({os.cpu_count()} cores)',
        'cpu_matrix_flags': cpu_bf16_flags(),
        'faiss': faiss.__version__,
        'faiss_threads': faiss.omp_get_max_threads(),
        'backend': got['backend'],
        'n_train': args.n_train,
        'n_test': args.n_test,
        'dim': args.dim,
        'classes': args.classes,
        'k': args.k,
        'query_batch': args.query_batch,
        'seconds': got['seconds'],
        'peak_rss_gib': got['peak_rss_gib'],
        'rss_before_search_gib': got['rss_before_search_gib'],
        'index_gib': round(args.n_train * args.dim * 4 / 2**30, 3),
        'search_gflop_per_s': round(flops / got['seconds']['search'] / 1e9, 1),
        'load_average_1min': {'before': round(load_before[0], 2), 'after': round(load_after[0], 2)},
        'goal_seconds': 300,
        'top1_synthetic': got['top1'],
    }
    if scale != 1:
        result['exact_extrapolated'] = (
            f'exact search timed on the first {got["n_queries"]} queries '
            f'({got["seconds_measured"]}) and scaled linearly to {args.n_test}'
        )
    if args.shortlist:
        result['shortlist'] = {
            'multiple_of_k': args.shortlist,
            'backend': fast['backend'],
            'seconds': fast['seconds'],
            'peak_rss_gib': fast['peak_rss_gib'],
            'fallback_queries': fast['fallbacks'],
            'speedup_total': round(result['seconds']['total'] / fast['seconds']['total'], 2),
            'speedup_search': round(result['seconds']['search'] / fast['seconds']['search'], 2),
            'top1_agreement': {k: f'{n}/{got["n_queries"]}' for k, n in agree.items()},
            'top1_agreement_percent': round(100.0 * min(agree.values()) / got['n_queries'], 4),
            'top1_synthetic': fast['top1'],
        }
    tag = f'_bf16shortlist{args.shortlist:g}' if args.shortlist else ''
    path = Path(args.out) if args.out else RESULTS_DIR / f'knn_{args.n_train}x{args.dim}_{args.n_test}q_cpu{tag}.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + '\n')
    print(json.dumps(result, indent=2))
    print(f'wrote {path}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())

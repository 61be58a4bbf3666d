"""k-NN time and peak memory at ImageNet size: 1,281,167 x 384 training features against 50,000 queries.

    python -m bench.knn_throughput                                  # ImageNet size -> bench/results/knn_*.json
    python -m bench.knn_throughput --n-train 100000 --n-test 5000   # a quick look

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


def write_features(folder: Path, n_train: int, n_test: int, dim: int, classes: int, seed: int = 0) -> None:
    import torch

    from eval.features import FEATURES_FORMAT, save_features
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    for role, n in (('train', n_train), ('test', n_test)):
        labels = rng.integers(classes, size=n)
        feats = np.empty((n, dim), np.float32)
        for start in range(0, n, 1 << 16):   # chunks: no float64 copy of the whole matrix
            stop = min(start + (1 << 16), n)
            noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * (3.0 / np.sqrt(dim))
            feats[start:stop] = centers[labels[start:stop]] + noise   # noise 3x the centre norm: not trivial
        save_features(folder / f'{role}.safetensors', torch.from_numpy(feats), torch.from_numpy(labels),
                      [f'{role}_{i:08d}' for i in range(n)],
                      {'format': FEATURES_FORMAT, 'knn_dim': dim, 'num_classes': classes, 'role': role})


def resident_gib() -> float:
    """Current resident memory of this process (Linux /proc)."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 2 ** 20
    return float('nan')


def search_phase(folder: Path, ks, query_batch: int) -> dict:
    """What knn_eval.py runs after extraction; returns timings and this process's peak RSS."""
    from eval.features import FeatureFile
    from eval.knn import knn_classify
    import faiss  # noqa: F401  (its import is not the k-NN's memory)
    train, test = FeatureFile(folder / 'train.safetensors'), FeatureFile(folder / 'test.safetensors')
    baseline_gib = resident_gib()
    t0 = time.perf_counter()
    res = knn_classify(train.knn_rows(), train.labels, test.knn_rows(), test.labels, ks,
                       num_classes=train.num_classes, query_batch=query_batch, keep_predictions=False)
    total = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {'seconds': {**res.seconds, 'total': round(total, 3)}, 'peak_rss_gib': round(peak_kib / 2 ** 20, 3),
            'rss_before_search_gib': round(baseline_gib, 3),
            'top1': res.summary()['top1'], 'backend': res.backend}


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
    p.add_argument('--search-only', help=argparse.SUPPRESS)   # phase 2, in its own process
    args = p.parse_args(argv)
    if args.search_only:
        print(json.dumps(search_phase(Path(args.search_only), args.k, args.query_batch)))
        return 0

    import faiss
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        t0 = time.perf_counter()
        write_features(Path(tmp), args.n_train, args.n_test, args.dim, args.classes)
        print(f"synthetic features written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        load_before = os.getloadavg()
        out = subprocess.run([sys.executable, '-m', 'bench.knn_throughput', '--search-only', tmp, '--k',
                              *map(str, args.k), '--query-batch', str(args.query_batch)],
                             check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        load_after = os.getloadavg()
    got = json.loads(out.stdout.strip().splitlines()[-1])
    flops = 2.0 * args.n_train * args.n_test * args.dim
    result = {
        'benchmark': 'knn_throughput', 'date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'device': f"{cpu_name()} ({os.cpu_count()} cores)", 'faiss': faiss.__version__,
        'faiss_threads': faiss.omp_get_max_threads(), 'backend': got['backend'],
        'n_train': args.n_train, 'n_test': args.n_test, 'dim': args.dim, 'classes': args.classes, 'k': args.k,
        'query_batch': args.query_batch, 'seconds': got['seconds'], 'peak_rss_gib': got['peak_rss_gib'],
        'rss_before_search_gib': got['rss_before_search_gib'],
        'index_gib': round(args.n_train * args.dim * 4 / 2 ** 30, 3),
        'search_gflop_per_s': round(flops / got['seconds']['search'] / 1e9, 1),
        'load_average_1min': {'before': round(load_before[0], 2), 'after': round(load_after[0], 2)},
        'goal_seconds': 300, 'top1_synthetic': got['top1'],
    }
    path = Path(args.out) if args.out else RESULTS_DIR / f"knn_{args.n_train}x{args.dim}_{args.n_test}q_cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + '\n')
    print(json.dumps(result, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())

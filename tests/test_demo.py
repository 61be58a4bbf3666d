"""The README's demo end to end with a reduced budget: every stage produces its files and the report has
its structure."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path('/usr/share/datasets/fashion-mnist')


@pytest.mark.slow
@pytest.mark.skipif(not (FMNIST / 'train-images-idx3-ubyte.gz').exists(),
                    reason=f'needs Fashion-MNIST in {FMNIST} (Debian package dataset-fashion-mnist)')
def test_demo_with_a_reduced_budget(tmp_path):
    out, data = tmp_path / 'demo', tmp_path / 'fmnist'
    cmd = [sys.executable, 'demo.py', '--iterations', '40', '--out', str(out), '--data', str(data)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ('shards', 'pretrain skipat', 'pretrain vit', 'k-NN skipat', 'linear probe vit', 'benchmark',
                  'total'):
        assert stage in proc.stdout, stage
    assert (data / 'train-index.json').is_file() and (data / 'test-index.json').is_file()
    for name in ('skipat', 'vit'):
        run = out / name
        summary = json.loads((run / 'summary.json').read_text())
        assert summary['finished'] and summary['iterations'] == 40 and summary['device']['world_size'] == 2
        assert (run / 'export' / 'teacher.safetensors').is_file() and list((run / 'tb').glob('events.*'))
        evals = [json.loads(p.read_text()) for p in (run / 'eval').glob('*.json')]
        knn = [e for e in evals if e.get('evaluator') == 'knn']
        # 4 per-epoch exports + random init (+ raw pixels for the ViT run)
        assert len(knn) >= 5 and any(e.get('evaluator') == 'linear' for e in evals)
    assert (out / 'bench' / 'backbone_infer_small_cpu.json').is_file()
    report = out / 'report'
    md = next(report.glob('*.md')).read_text()
    assert 'SkipAt' in md or 'skipat' in md
    assert list(report.glob('*.png')) and list(report.glob('*.json'))
    # a second run reuses every finished stage
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and 'reusing finished run' in again.stdout and 'reusing' in again.stdout

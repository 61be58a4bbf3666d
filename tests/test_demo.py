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
@pytest.mark.skipif(
    not (FMNIST / 'train-images-idx3-ubyte.gz').exists(),
    reason=f'needs Fashion-MNIST in {FMNIST} (Debian package dataset-fashion-mnist)',
)
def test_demo_with_a_reduced_budget(tmp_path):
    out, data = tmp_path / 'demo', tmp_path / 'fmnist'
    cmd = [sys.executable, 'demo.py', '--iterations', '40', '--out', str(out), '--data', str(data)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ('shards', 'pretrain skipat', 'pretrain vit', 'k-NN skipat', 'linear probe vit', 'benchmark', 'total'):
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
    check_report_figures(json.loads((report / 'report.json').read_text()))
    # a second run reuses every finished stage
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and 'reusing finished run' in again.stdout and 'reusing' in again.stdout


def check_report_figures(report):
    """What the report says, against what does not depend on the training budget: raw pixels and random init
    give the full demo's figures (docs/demo.md; they are the same at any --iterations, to one test image across
    CPUs); trained teachers have accuracies far above chance (10 classes), and the SkipAt row is compared with
    the ViT row."""
    [part] = report['datasets'].values()
    rows = {(r['skipat'], r.get('baseline')): r for r in part['rows']}
    pixels = next(r for r in part['rows'] if r.get('baseline') == 'pixels')
    assert pixels['knn_top1'] == pytest.approx(82.54, abs=0.011)
    assert rows[(True, 'random-init')]['knn_top1'] == pytest.approx(63.56, abs=0.011)
    assert rows[(False, 'random-init')]['knn_top1'] == pytest.approx(63.37, abs=0.011)
    skipat, vit = rows[(True, None)], rows[(False, None)]
    for row in (skipat, vit):
        # 40 iterations: k-NN 53.5, linear 35.4 (a short probe) here; chance is 10
        assert row['iteration'] == 40 and 40 < row['knn_top1'] < 100 and 20 < row['linear_top1'] < 100
        assert row['device_hours'] > 0
    assert skipat['compared_with'] == vit['run']
    assert skipat['knn_top1_diff'] == pytest.approx(skipat['knn_top1'] - vit['knn_top1'])
    assert skipat['device_hours_saving_pct'] == pytest.approx(
        100 * (vit['device_hours'] - skipat['device_hours']) / vit['device_hours']
    )


@pytest.mark.parametrize('seeds', ['0', '-2'])
def test_seeds_below_one_are_refused_in_one_line(tmp_path, seeds):
    out = tmp_path / 'demo'
    proc = subprocess.run(
        [sys.executable, 'demo.py', '--seeds', seeds, '--out', str(out), '--data', str(tmp_path / 'fmnist')],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode, proc.stdout) == (2, '')
    assert proc.stderr == f'demo.py: error: --seeds must be at least 1, got {seeds}\n'
    assert not out.exists() and not (tmp_path / 'fmnist').exists()  # refused before any stage


def test_seed_zero_keeps_the_single_seed_run_folders():
    from demo import Demo

    assert [Demo.run_name(name, seed) for seed in range(3) for name in ('skipat', 'vit')] == [
        'skipat',
        'vit',
        'skipat-seed1',
        'vit-seed1',
        'skipat-seed2',
        'vit-seed2',
    ]

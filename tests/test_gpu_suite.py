"""The prepared GPU suite (bench.gpu_suite) in its --dry-run mode: every stage on the CPU with tiny sizes,
through the same code as on the GPU, so that the suite cannot rot between GPU runs; and the runner's
time caps and budget."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_suite.runner import run_stage, run_suite
from bench.gpu_suite.sizes import STAGE_SECONDS

ROOT = Path(__file__).resolve().parents[1]
STAGES = [n for n in STAGE_SECONDS if n != 'prepare']


@pytest.mark.slow
def test_dry_run_runs_every_stage_ok(tmp_path):
    out = tmp_path / 'out'
    proc = subprocess.run(
        [sys.executable, '-m', 'bench.gpu_suite', '--dry-run', '--out', str(out), '--work', str(tmp_path / 'work')],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    results = {n: json.loads((out / f'{n}.json').read_text()) for n in STAGES}
    failed = {n: (r['status'], r['error'], r['log_tail'][-2000:]) for n, r in results.items() if r['status'] != 'ok'}
    assert not failed and proc.returncode == 0, (failed, proc.stdout[-2000:], proc.stderr[-2000:])
    assert sorted(p.name for p in out.iterdir()) == sorted([f'{n}.json' for n in STAGES] + ['summary.json'])
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['ok'] and summary['mode'] == 'dry' and summary['stages']['prepare']['status'] == 'ok'
    for r in results.values():
        assert r['device'] == summary['device'] and r['wall_s'] <= r['cap_s']

    m = {n: r['measurements'] for n, r in results.items()}
    assert m['env']['torch'] and m['env']['packages']['deepspeed']
    trainer = m['trainer']
    assert trainer['resume']['bit_identical'] and trainer['resume']['ok']  # CPU, fp32: exact
    assert trainer['sigterm']['checkpoint_at'] < trainer['resume']['iterations']
    assert trainer['zero2_cut']['finished'] and trainer['zero0_compiled']['finished']
    freeze = trainer['zero0_compiled_freeze']
    assert freeze['last_layer_unchanged_while_frozen'] and freeze['last_layer_moved_after']
    assert trainer['fp16']['status'] == 'skipped'
    assert {(r['mode'], r['batch_size']) for r in m['backbone']['results']} == {('infer', 2), ('train', 2)}
    assert m['step']['results'][0]['model_gflops_per_image']['skipat'] > 0
    saving = m['saving']['results']
    assert {(r['mode'], r['attention']) for r in saving} == {('infer', 'explicit'), ('dino_step', 'explicit')}
    assert all(r['ratio_skipat_over_vit'] > 0 and r['time_share']['skipat']['phi'] > 0 for r in saving)
    assert 0 < m['augment']['share_of_step']['share'] < 1 and m['augment']['decode_cpu_1thread_img_per_s'] > 0
    assert m['knn']['comparison']['predictions_match']
    assert m['knn']['comparison']['backends'] == ['torch-cpu', 'faiss-cpu']
    g = m['equal_images']
    assert g['vit']['images_seen'] == g['skipat']['images_seen'] > 0
    assert g['skipat_over_vit_device_seconds_per_image'] > 0
    assert set(g['knn_vit']['top1']) == set(g['knn_skipat']['top1']) == {'5', '10'}


def test_a_stage_past_its_cap_is_killed_and_recorded_as_timeout(tmp_path):
    out, work = tmp_path / 'out', tmp_path / 'work'
    work.mkdir()
    result = run_stage('env', 'dry', 0.5, work, out)  # importing torch alone takes longer
    assert result['status'] == 'timeout' and 'time cap of 0 s' in result['error']
    assert result['returncode'] is None and result['wall_s'] < 15


def test_stages_without_budget_left_are_skipped_not_started(tmp_path):
    summary = run_suite('dry', tmp_path / 'out', tmp_path / 'work', budget=5.0)
    assert not summary['ok']
    assert {s['status'] for s in summary['stages'].values()} == {'skipped'}
    env = json.loads((tmp_path / 'out' / 'env.json').read_text())
    assert env['status'] == 'skipped' and 'budget left: not started' in env['error']

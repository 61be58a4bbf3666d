"""Report: table and plot from two fake run folders (SkipAt and plain ViT of one config), and from a run whose
per-epoch exports were really evaluated."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from skipssl.checkpoint import build_backbone, save_backbone
from skipssl_common.artefacts import ExportMeta, RunSummary
from skipssl_eval.errors import EvalError
from skipssl_eval.pipeline import run_knn
from skipssl_eval.report import collect, main, write_report
from skipssl_eval.results import write_result
from skipssl_eval.source import ModelInfo
from skipssl_eval.synthetic import write_shards

DATA = 'd4' * 32  # the data digest of the fake runs' results


def fake_run(root: Path, name: str, skipat: bool, hours: list, knn: list, linear: list, config='dino_fmnist_tiny'):
    """A run folder as the trainer leaves it (summary.json) with k-NN and linear results per epoch export."""
    run = root / name
    model = 'vit_tiny_patch16_skipat_224' if skipat else 'vit_tiny_patch16_224'
    per_epoch = [
        {
            'epoch': e,
            'iteration': 100 * (e + 1),
            'images_seen': 6400 * (e + 1),
            'device_hours': h,
            'images_per_s': 500.0,
            'loss': 5.0,
        }
        for e, h in enumerate(hours)
    ]
    run.mkdir(parents=True)
    RunSummary(
        run_name=name,
        model={'name': model, 'kwargs': {}},
        skipat=skipat,
        config_name=config,
        epochs_planned=len(hours),
        epochs_done=len(hours),
        iterations=100 * len(hours),
        images_seen=6400 * len(hours),
        images_per_s=6400 * len(hours) / (hours[-1] * 3600),
        device={'kind': 'cuda', 'name': 'H100', 'world_size': 1},
        device_hours=hours[-1],
        device_hours_unit='GPU-hours',
        per_epoch=per_epoch,
        finished=True,
    ).write(run)
    for e, (k, lin) in enumerate(zip(knn, linear)):
        it = 100 * (e + 1)
        info = ModelInfo('x', 'export', model, {}, 'ab' * 32, f'{it:08d}', iteration=it, epoch=e + 1, run_dir=str(run))
        write_result(
            run / 'eval',
            'knn',
            info,
            'fmnist',
            DATA,
            {'k': [10, 20], 'top1': {'10': k + 1, '20': k}, 'top5': {'10': 99.0, '20': 99.0}},
        )
        if lin is not None:
            write_result(run / 'eval', 'linear', info, 'fmnist', DATA, {'top1': lin, 'top5': 99.5})
    return run


def test_table_compares_skipat_with_the_vit_run_of_the_same_config(tmp_path):
    vit = fake_run(tmp_path, 'vit', False, [1.0, 2.0], [70.0, 75.0], [78.0, 80.0])
    skip = fake_run(tmp_path, 'skipat', True, [0.8, 1.5], [71.0, 74.5], [None, 81.0])
    baseline = ModelInfo('vit_tiny_patch16_224', 'random-init', 'vit_tiny_patch16_224', {}, 'cd' * 32, 'random-init')
    write_result(vit / 'eval', 'knn', baseline, 'fmnist', DATA, {'k': [20], 'top1': {'20': 40.0}, 'top5': {'20': 80.0}})
    paths = write_report([vit, skip], tmp_path / 'out', k=20)
    report = json.loads(paths['json'].read_text())
    rows = {r['run']: r for r in report['datasets']['fmnist']['rows']}
    assert set(rows) == {'vit', 'skipat', 'vit (random-init)'}
    s, v = rows['skipat'], rows['vit']
    assert (v['epochs'], v['images_seen'], v['device_hours'], v['knn_top1'], v['linear_top1']) == (
        2,
        12800,
        2.0,
        75.0,
        80.0,
    )
    assert s['compared_with'] == 'vit'
    assert s['device_hours_saving_pct'] == pytest.approx(25.0)
    assert s['knn_top1_diff'] == pytest.approx(-0.5) and s['linear_top1_diff'] == pytest.approx(1.0)
    assert s['images_per_s'] == pytest.approx(12800 / 5400)
    assert 'device_hours_saving_pct' not in v and rows['vit (random-init)']['knn_top1'] == 40.0
    md = paths['md'].read_text()
    assert (
        '| skipat | vit_tiny_patch16_skipat_224 (SkipAt) | 2/2 | 12,800 | 2.4 | 1.5 GPU-h | 74.50 | '
        '81.00 (cached) | +25.0% | -0.50 | +1.00 |'
    ) in md
    # one point per run, evaluator and checkpoint (+ the random-init baseline at 0 hours)
    points = report['datasets']['fmnist']['points']
    assert len(points) == 2 + 2 + 2 + 1 + 1
    assert {(p['run'], p['device_hours'], p['top1']) for p in points if p['evaluator'] == 'knn'} == {
        ('vit', 0.0, 40.0),
        ('vit', 1.0, 70.0),
        ('vit', 2.0, 75.0),
        ('skipat', 0.8, 71.0),
        ('skipat', 1.5, 74.5),
    }
    with Image.open(paths['png']) as png:
        assert png.format == 'PNG' and png.size[0] > 400
    assert main([str(vit), str(skip), '--out-dir', str(tmp_path / 'cli'), '--k', '10']) == 0
    assert (
        json.loads((tmp_path / 'cli' / 'report.json').read_text())['datasets']['fmnist']['rows'][0]['knn_top1'] == 76.0
    )


def test_bad_run_folders_are_named(tmp_path):
    with pytest.raises(EvalError, match='has no summary.json'):
        collect([tmp_path])
    a = fake_run(tmp_path, 'a', False, [1.0], [70.0], [75.0])
    b = fake_run(tmp_path, 'b', False, [1.0], [70.0], [75.0])
    with pytest.raises(EvalError, match="two plain-ViT runs share config_name 'dino_fmnist_tiny'"):
        collect([a, b])
    assert main([str(tmp_path / 'nope')]) == 2


def test_report_of_really_evaluated_exports(tmp_path):
    """knn_eval over every per-epoch export of a run (+ a random-init baseline), then the report."""
    write_shards(tmp_path / 'train', 'train', [40, 24], num_classes=3, size=16)
    write_shards(tmp_path / 'test', 'test', [20], num_classes=3, size=16, seed=1)
    kwargs = {'img_size': 16, 'patch_size': 4, 'depth': 4, 'embed_dim': 32, 'num_heads': 2, 'in_chans': 1}
    data = {'channels': 1, 'mean': [0.5], 'std': [0.25], 'eval_resize': 16, 'eval_crop': 16}
    run = fake_run(tmp_path, 'vit', False, [0.1, 0.2], [], [])
    for epoch in (1, 2):
        torch.manual_seed(epoch)
        save_backbone(
            build_backbone('vit_tiny_patch16_224', kwargs),
            run / 'export' / f'teacher-{100 * epoch:08d}.safetensors',
            ExportMeta(
                'vit_tiny_patch16_224',
                kwargs,
                iteration=100 * epoch,
                epoch=epoch,
                device_hours=0.1 * epoch,
                device_hours_unit='GPU-hours',
                run_dir=str(run),
                data=data,
            ),
        )
    common = dict(
        train_shards=str(tmp_path / 'train'),
        test_shards=str(tmp_path / 'test'),
        ks=[5, 20],
        num_workers=0,
        dataset='toy',
    )
    results = run_knn(str(run), all_exports=True, **common)
    assert [r['iteration'] for r in results] == [100, 200]
    run_knn('vit_tiny_patch16_224', run_dir=str(run), model_kwargs=kwargs, **common)  # data settings: the run's
    digest = results[0]['data_digest'][:8]
    assert sorted(p.name for p in (run / 'eval').glob('knn-*.json')) == [
        f'knn-00000100-toy-{digest}.json',
        f'knn-00000200-toy-{digest}.json',
        f'knn-random-init-toy-{digest}.json',
    ]
    report = collect([run], k=20)
    part = report['datasets']['toy']
    assert [r['run'] for r in part['rows']] == ['vit', 'vit (random-init)']
    assert part['rows'][0]['knn_top1'] == results[1]['top1']['20'] and part['rows'][0]['device_hours'] == 0.2
    assert [(p['iteration'], p['device_hours']) for p in part['points']] == [(0, 0.0), (100, 0.1), (200, 0.2)]
    # and the run's TensorBoard has them at the checkpoints' iterations (0: the random-init baseline)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in sorted((run / 'tb').glob('events.out.tfevents.*.knn')):
        acc = EventAccumulator(str(events))
        acc.Reload()
        scalars.update({e.step: e.value for e in acc.Scalars('eval/knn/toy/top1_k20')})
    assert sorted(scalars) == [0, 100, 200]
    assert scalars[100] == pytest.approx(results[0]['top1']['20']) and scalars[200] == pytest.approx(
        results[1]['top1']['20']
    )


def test_results_on_other_data_under_one_dataset_name_stay_apart(tmp_path):
    run = fake_run(tmp_path, 'vit', False, [1.0], [70.0], [None])
    info = ModelInfo(
        'x', 'export', 'vit_tiny_patch16_224', {}, 'ab' * 32, '00000100', iteration=100, epoch=1, run_dir=str(run)
    )
    relabelled = 'e5' * 32
    write_result(run / 'eval', 'knn', info, 'fmnist', relabelled, {'k': [20], 'top1': {'20': 2.0}, 'top5': {'20': 9.0}})
    assert len(list((run / 'eval').glob('knn-00000100-fmnist-*.json'))) == 2  # neither overwrote the other
    report = collect([run], k=20)
    assert {name: part['rows'][0]['knn_top1'] for name, part in report['datasets'].items()} == {
        f'fmnist@{DATA[:8]}': 70.0,
        f'fmnist@{relabelled[:8]}': 2.0,
    }
    assert collect([run], k=20, dataset=f'fmnist@{relabelled[:8]}')['datasets'].keys() == {f'fmnist@{relabelled[:8]}'}

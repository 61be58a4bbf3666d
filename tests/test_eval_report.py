"""Report: table and plot from two fake run folders (SkipAt and plain ViT of one config), from a run whose
per-epoch exports were really evaluated, and from runs of several seeds (groups, spread, confidence interval,
which runs are paired and why)."""

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from skipssl.checkpoint import build_backbone, save_backbone
from skipssl.config import load_config
from skipssl_common.artefacts import ExportMeta, RunSummary
from skipssl_eval.errors import EvalError
from skipssl_eval.pipeline import run_knn
from skipssl_eval.report import collect, main, write_report
from skipssl_eval.results import write_result
from skipssl_eval.source import ModelInfo
from skipssl_eval.synthetic import write_shards

DATA = 'd4' * 32  # the data digest of the fake runs' results


def fake_run(
    root: Path,
    name: str,
    skipat: bool,
    hours: list,
    knn: list,
    linear: list,
    config='dino_fmnist_tiny',
    fingerprint=None,
    seed=None,
    overrides=(),
    attention=None,
):
    """A run folder as the trainer leaves it (summary.json) with k-NN and linear results per epoch export; with
    a seed, also its config.yaml (the demo's config with ``overrides``, ``model.attention`` where given)."""
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
        data_fingerprint=fingerprint,
    ).write(run)
    if seed is not None:
        cfg = load_config(
            Path(__file__).resolve().parents[1] / 'configs' / 'demo_fmnist_skipat.yaml',
            [
                f'experiment.name={config}',
                f'experiment.seed={seed}',
                f'experiment.output_dir={run}',
                f'model.name={model}',
                'data.train_shards=/data/fmnist/train-index.json',
                *overrides,
            ],
        ).to_dict()
        if attention is not None:
            cfg['model']['attention'] = attention
        (run / 'config.yaml').write_text(yaml.safe_dump(cfg, sort_keys=False))
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
        '| skipat | vit_tiny_patch16_skipat_224 (SkipAt) | fused | — | 2/2 | 12,800 | 2.4 | 1.5 GPU-h | 74.50 | '
        '81.00 (cached) | +25.0% | -0.50 | +1.00 |'
    ) in md
    # one seed each: the group rows say there is no interval rather than print one
    assert (
        '| skipat | vit_tiny_patch16_skipat_224 (SkipAt) | fused | — | 74.50 | 81.00 | 1.5 GPU-h | +25.0% '
        '| -0.50 (no interval: n=1: a standard deviation needs 2 seeds) | +1.00 (no interval: n=1: a standard '
        'deviation needs 2 seeds) |'
    ) in md
    group = next(g for g in report['datasets']['fmnist']['groups'] if g['skipat'])
    assert group['knn_top1_diff']['low'] is None and group['knn_top1_diff']['estimate'] == pytest.approx(-0.5)
    # run folders without config.yaml or data fingerprint: paired as before, with a note
    assert report['datasets']['fmnist']['notes'] == [
        'skipat is compared with vit, but the data identity is unknown (both: no data fingerprint; both: no '
        'config.yaml)'
    ]
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
    a = fake_run(tmp_path, 'a', False, [1.0], [70.0], [75.0], seed=0)
    b = fake_run(tmp_path, 'b', False, [1.0], [70.0], [75.0], seed=0, overrides=['optim.base_lr=0.001'])
    s = fake_run(tmp_path, 's', True, [1.0], [70.0], [75.0], seed=0)
    collect([a, b])  # two ViT variants alone are a fine report
    with pytest.raises(EvalError, match="two plain-ViT runs share config_name 'dino_fmnist_tiny' and their data"):
        collect([a, b, s])
    assert main([str(tmp_path / 'nope')]) == 2
    (s / 'config.yaml').write_text('experiment: [unclosed')
    with pytest.raises(EvalError, match=r's/config.yaml is unreadable: while parsing'):
        collect([a, s])
    (s / 'config.yaml').write_text('- a list')
    with pytest.raises(EvalError, match=r's/config.yaml is not a run config'):
        collect([a, s])


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


def seeded_runs(root: Path, name: str, skipat: bool, finals: dict, **kw) -> list:
    """One fake run per seed (config.yaml included): {seed: (k-NN, linear, device-hours) at the end}."""
    return [
        fake_run(
            root,
            name if seed == 0 else f'{name}-seed{seed}',
            skipat,
            [h / 2, h],
            [k - 5, k],
            [None, lin],
            seed=seed,
            **kw,
        )
        for seed, (k, lin, h) in finals.items()
    ]


def t975_two_df(p=0.975):
    """Student's t quantile for 2 degrees of freedom in closed form: F(t) = 1/2 + t / (2 sqrt(2 + t^2))."""
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


SKIPAT = {0: (69.84, 67.97, 0.092), 1: (70.10, 68.50, 0.095), 2: (69.20, 67.10, 0.090)}
VIT = {0: (70.62, 68.91, 0.083), 1: (70.90, 69.20, 0.085), 2: (70.05, 68.40, 0.084)}


def test_runs_differing_only_in_their_seed_are_one_group_with_a_paired_interval(tmp_path):
    runs = seeded_runs(tmp_path, 'skipat', True, SKIPAT) + seeded_runs(tmp_path, 'vit', False, VIT)
    paths = write_report(runs, tmp_path / 'out')
    part = json.loads(paths['json'].read_text())['datasets']['fmnist']
    groups = {g['group']: g for g in part['groups']}
    assert set(groups) == {'skipat, skipat-seed1, skipat-seed2', 'vit, vit-seed1, vit-seed2'}
    s, v = groups['skipat, skipat-seed1, skipat-seed2'], groups['vit, vit-seed1, vit-seed2']
    assert s['seeds'] == [0, 1, 2] and s['n'] == 3 and s['compared_with'] == v['group'] and 'compared_with' not in v
    for i, key in enumerate(('knn_top1', 'linear_top1', 'device_hours')):
        for g, finals in ((s, SKIPAT), (v, VIT)):
            values = [f[i] for f in finals.values()]
            assert g[key]['mean'] == pytest.approx(statistics.mean(values), abs=1e-12)
            assert g[key]['std'] == pytest.approx(statistics.stdev(values), abs=1e-12)
        # the same seeds on both sides: paired by seed, the textbook interval mean(d) +- t(0.975, n-1) sd(d)/sqrt(n)
        d = [SKIPAT[seed][i] - VIT[seed][i] for seed in (0, 1, 2)]
        half = t975_two_df() * statistics.stdev(d) / math.sqrt(3)
        diff = s[f'{key}_diff']
        assert (diff['method'], diff['n'], diff['df']) == ('paired', [3], 2.0)
        assert diff['estimate'] == pytest.approx(statistics.mean(d), abs=1e-12)
        assert (diff['low'], diff['high']) == pytest.approx((statistics.mean(d) - half, statistics.mean(d) + half))
    hours = [statistics.mean(f[2] for f in x.values()) for x in (SKIPAT, VIT)]
    assert s['device_hours_saving_pct'] == pytest.approx(100 * (hours[1] - hours[0]) / hours[1])
    # each run against the ViT run of its seed
    rows = {r['run']: r for r in part['rows']}
    assert rows['skipat-seed1']['compared_with'] == 'vit-seed1' and rows['skipat-seed1']['seed'] == 1
    assert rows['skipat-seed2']['knn_top1_diff'] == pytest.approx(69.20 - 70.05)
    assert {r['group'] for r in part['rows']} == set(groups)
    # no fingerprints (runs from before them): paired by data.train_shards, with a note
    assert part['notes'] == [
        f'{s["group"]} is compared with {v["group"]} by data.train_shards (/data/fmnist/train-index.json): '
        'the data identity is unknown (both: no data fingerprint)'
    ]
    md = paths['md'].read_text()
    d = [SKIPAT[seed][0] - VIT[seed][0] for seed in (0, 1, 2)]
    half = t975_two_df() * statistics.stdev(d) / math.sqrt(3)
    knn = f'{statistics.mean(d):+.2f} [{statistics.mean(d) - half:+.2f}, {statistics.mean(d) + half:+.2f}]'
    assert (
        f'| skipat, skipat-seed1, skipat-seed2 | vit_tiny_patch16_skipat_224 (SkipAt) | fused | 0, 1, 2 | '
        f'69.71 ± 0.46 (n=3) | 67.86 ± 0.71 (n=3) | 0.0923 ± 0.00252 GPU-h (n=3) | -9.9% | {knn} (paired, 3 pairs) |'
    ) in md
    assert '- skipat, skipat-seed1, skipat-seed2 is compared with' in md
    # the plot: one line per group, the mean over seeds at each checkpoint
    assert {p['group'] for p in part['points']} == set(groups)
    with Image.open(paths['png']) as png:
        assert png.format == 'PNG'


def test_other_seeds_on_each_side_give_welchs_interval(tmp_path):
    runs = seeded_runs(tmp_path, 'skipat', True, SKIPAT) + seeded_runs(
        tmp_path, 'vit', False, {s: VIT[s] for s in (0, 1)}
    )
    [s] = [g for g in collect(runs)['datasets']['fmnist']['groups'] if g['skipat']]
    diff = s['knn_top1_diff']
    x, y = [f[0] for f in SKIPAT.values()], [VIT[0][0], VIT[1][0]]
    vx, vy = statistics.variance(x) / 3, statistics.variance(y) / 2
    assert (diff['method'], diff['n']) == ('welch', [3, 2])
    assert diff['df'] == pytest.approx((vx + vy) ** 2 / (vx**2 / 2 + vy**2 / 1))  # Welch-Satterthwaite
    assert diff['estimate'] == pytest.approx(statistics.mean(x) - statistics.mean(y))
    assert diff['high'] - diff['low'] > 2 * 1.96 * math.sqrt(vx + vy)  # t with few df: wider than the normal's


def test_runs_pretrained_on_other_data_are_not_paired(tmp_path):
    skip = seeded_runs(tmp_path, 'skipat', True, SKIPAT, fingerprint='a' * 64)
    vit = seeded_runs(tmp_path, 'vit', False, VIT, fingerprint='b' * 64)
    part = collect(skip + vit)['datasets']['fmnist']
    assert not any('compared_with' in g for g in part['groups'])
    assert not any('compared_with' in r or 'knn_top1_diff' in r for r in part['rows'])
    assert part['notes'] == [
        'skipat, skipat-seed1, skipat-seed2 is not compared with vit, vit-seed1, vit-seed2: they were pretrained '
        'on different data (data fingerprints aaaaaaaaaaaa and bbbbbbbbbbbb)'
    ]
    # the same fingerprint: paired, no note
    same = seeded_runs(tmp_path / 'same', 'vit', False, VIT, fingerprint='a' * 64)
    part = collect(skip + same)['datasets']['fmnist']
    assert part['notes'] == [] and [g.get('compared_with') for g in part['groups']] == [
        'vit, vit-seed1, vit-seed2',
        None,
    ]
    # one seed rebuilt on other data is not the same experiment: a group of its own
    other = fake_run(tmp_path, 'skipat-seed3', True, [0.1], [60.0], [None], seed=3, fingerprint='c' * 64)
    groups = [g['group'] for g in collect([*skip, other])['datasets']['fmnist']['groups']]
    assert groups == ['skipat, skipat-seed1, skipat-seed2', 'skipat-seed3']
    # a fingerprint on one side only: the same data.train_shards pairs them, with a note
    unknown = seeded_runs(tmp_path / 'unknown', 'vit', False, VIT)
    part = collect(skip + unknown)['datasets']['fmnist']
    assert part['groups'][0]['compared_with'] == 'vit, vit-seed1, vit-seed2'
    assert part['notes'] == [
        'skipat, skipat-seed1, skipat-seed2 is compared with vit, vit-seed1, vit-seed2 by data.train_shards '
        '(/data/fmnist/train-index.json): the data identity is unknown (vit, vit-seed1, vit-seed2: no data fingerprint)'
    ]
    # no fingerprints, other data.train_shards: not paired either
    shards = ['data.train_shards=/data/other/train-index.json']
    old = seeded_runs(tmp_path / 'old', 'vit', False, {0: VIT[0]}, overrides=shards)
    part = collect([*seeded_runs(tmp_path / 'old', 'skipat', True, {0: SKIPAT[0]}), *old])['datasets']['fmnist']
    assert part['notes'] == [
        'skipat is not compared with vit: they were pretrained on different data.train_shards '
        '(/data/fmnist/train-index.json and /data/other/train-index.json)'
    ]
    assert not any('compared_with' in g for g in part['groups'])


def test_the_attention_kind_is_a_column_and_pairs_like_with_like(tmp_path):
    skip = seeded_runs(tmp_path, 'skipat', True, {0: SKIPAT[0]}, attention='explicit', fingerprint='a' * 64)
    fused = seeded_runs(tmp_path, 'vit', False, {0: VIT[0]}, fingerprint='a' * 64)  # no model.attention: fused
    explicit = seeded_runs(
        tmp_path, 'vit-explicit', False, {0: (71.0, 69.0, 0.2)}, attention='explicit', fingerprint='a' * 64
    )
    paths = write_report([*skip, *fused, *explicit], tmp_path / 'out')
    part = json.loads(paths['json'].read_text())['datasets']['fmnist']
    assert {r['run']: r['attention'] for r in part['rows']} == {
        'skipat': 'explicit',
        'vit': 'fused',
        'vit-explicit': 'explicit',
    }
    assert [g['attention'] for g in part['groups']] == ['explicit', 'fused', 'explicit']
    assert part['groups'][0]['compared_with'] == 'vit-explicit' and part['notes'] == []
    assert '| skipat | vit_tiny_patch16_skipat_224 (SkipAt) | explicit | 0 | 2/2 |' in paths['md'].read_text()
    # with only the other kind at hand: compared, and the note says so
    part = collect([*skip, *fused])['datasets']['fmnist']
    assert part['groups'][0]['compared_with'] == 'vit'
    assert part['notes'] == [
        "skipat (explicit attention) is compared with vit (fused attention): its device-hour saving mixes SkipAt's "
        "with the attention kernel's"
    ]

"""Accuracy against training cost, SkipAt against plain ViT: a Markdown + JSON table and a PNG plot.

    skipssl-report runs/dino_fmnist_tiny_vit runs/dino_fmnist_tiny_skipat [--k 20] [--out-dir reports/x]

For each run folder: ``summary.json`` (written by the trainer) and the evaluators' ``eval/*.json``. One row per
run and dataset, at the newest evaluated checkpoint: model, epochs, images seen, images/s, device-hours
(measured by the trainer; GPU-hours on GPUs, core-hours on CPUs), k-NN top-1 (at --k) and linear top-1
(DINO's augmented protocol where it was run, else on cached features). A SkipAt run is compared with the
plain-ViT run of the same ``config_name``: device-hour saving (%) and accuracy difference (points).
Random-init baselines get rows of their own. The plot has one point per run and evaluated checkpoint
(accuracy against device-hours), as in the SkipAt paper's DINO figure.
"""

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

from skipssl_common.artefacts import SUMMARY_FILE, ArtefactError, RunSummary
from skipssl_common.io import atomic_path, atomic_write_json, atomic_write_text

from .errors import EvalError
from .results import read_results, writable_dir

BASELINE_TAGS = ('random-init', 'pixels')
LINEAR_EVALUATORS = ('linear_augment', 'linear')  # preferred first


def load_summary(run_dir: Path) -> RunSummary:
    if not Path(run_dir).is_dir():
        raise EvalError(f'run folder {run_dir} does not exist')
    if not (Path(run_dir) / SUMMARY_FILE).is_file():
        raise EvalError(f'{run_dir} has no {SUMMARY_FILE} (not a training run folder, or training never started)')
    try:
        return RunSummary.read(run_dir)
    except OSError as exn:
        raise EvalError(f'{Path(run_dir) / SUMMARY_FILE} is unreadable: {exn}') from exn
    except ArtefactError as exn:
        raise EvalError(str(exn)) from exn


def _final(summary: RunSummary) -> Dict[str, Any]:
    return {'epoch': summary.epochs_done, 'images_seen': summary.images_seen, 'device_hours': summary.device_hours}


def at_iteration(summary: RunSummary, result: Dict) -> Dict[str, Any]:
    """Training position of an evaluated checkpoint: the trainer's per-epoch record, else its final numbers,
    else what the checkpoint itself says."""
    it = result['checkpoint'].get('iteration')
    for e in summary.per_epoch:
        if e.get('iteration') == it:
            return {'epoch': e['epoch'] + 1, 'images_seen': e.get('images_seen'), 'device_hours': e.get('device_hours')}
    if it is not None and it == summary.iterations:
        return _final(summary)
    ck = result['checkpoint']
    return {'epoch': ck.get('epoch'), 'images_seen': ck.get('images_seen'), 'device_hours': ck.get('device_hours')}


def _iteration(result: Dict) -> int:
    it = result['checkpoint'].get('iteration')
    return -1 if it is None else int(it)


def _accuracy(result: Dict, k: int) -> Optional[float]:
    if result['evaluator'] == 'knn':
        return result['top1'].get(str(k))
    return result.get('top1')


def collect(run_dirs: List[Path], k: int = 20, dataset: Optional[str] = None) -> Dict[str, Any]:
    """The report as a dict: {'k', 'datasets': {name: {'rows': [...], 'points': [...]}}, 'units'}."""
    runs = []
    for run_dir in run_dirs:
        runs.append((Path(run_dir), load_summary(run_dir), read_results(run_dir)))
    _label_datasets([r for _, _, results in runs for r in results])
    runs = [
        (d, summary, [r for r in results if dataset in (None, r['dataset'], r['_dataset'])])
        for d, summary, results in runs
    ]
    datasets = sorted({r['_dataset'] for _, _, results in runs for r in results})
    if dataset is not None and not datasets:
        raise EvalError(f'no evaluation results for dataset {dataset!r} in {[str(d) for d in run_dirs]}')
    report = {
        'k': k,
        'generated': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'runs': [str(d) for d in run_dirs],
        'datasets': {},
    }
    for name in datasets:
        rows, points = [], []
        for run_dir, summary, results in runs:
            mine = [r for r in results if r['_dataset'] == name]
            rows += _rows(run_dir, summary, mine, k)
            points += _points(summary, mine, k)
        _compare(rows)
        report['datasets'][name] = {'rows': rows, 'points': points}
    return report


def _label_datasets(results: List[Dict]) -> None:
    """Set each result's '_dataset': its dataset name, or, where results under one name were computed on
    different data (a relabelled test set), the name and the data digest, so they are never mixed."""
    digests: Dict[str, set] = {}
    for r in results:
        digests.setdefault(r['dataset'], set()).add(r.get('data_digest'))
    for r in results:
        several = len(digests[r['dataset']]) > 1
        r['_dataset'] = f'{r["dataset"]}@{(r.get("data_digest") or "unknown")[:8]}' if several else r['dataset']


def _rows(run_dir: Path, summary: RunSummary, results: List[Dict], k: int) -> List[Dict]:
    trained = [r for r in results if r['checkpoint']['tag'] not in BASELINE_TAGS]
    base = {
        'run': summary.run_name,
        'run_dir': str(run_dir),
        'model': summary.model['name'],
        'skipat': bool(summary.skipat),
        'config_name': summary.config_name,
        'epochs_planned': summary.epochs_planned,
        'images_per_s': summary.images_per_s,
        'device_hours_unit': summary.device_hours_unit,
        'finished': summary.finished,
    }
    rows = []
    if trained or not results:
        it = max((_iteration(r) for r in trained), default=None)
        at = [r for r in trained if _iteration(r) == it]
        knn = next((r for r in at if r['evaluator'] == 'knn'), None)
        linear = next((r for e in LINEAR_EVALUATORS for r in at if r['evaluator'] == e), None)
        pos = at_iteration(summary, at[0]) if at else _final(summary)
        rows.append(
            {
                **base,
                'checkpoint': f'iteration {it}' if at else None,
                'iteration': it if at else None,
                'epochs': pos['epoch'],
                'images_seen': pos['images_seen'],
                'device_hours': pos['device_hours'],
                'knn_top1': _accuracy(knn, k) if knn else None,
                'linear_top1': linear['top1'] if linear else None,
                'linear_mode': linear['evaluator'] if linear else None,
            }
        )
    for tag in BASELINE_TAGS:
        at = [r for r in results if r['checkpoint']['tag'] == tag]
        if at:
            knn = next((r for r in at if r['evaluator'] == 'knn'), None)
            linear = next((r for e in LINEAR_EVALUATORS for r in at if r['evaluator'] == e), None)
            rows.append(
                {
                    **base,
                    'run': f'{summary.run_name} ({tag})',
                    'checkpoint': tag,
                    'iteration': 0,
                    'epochs': 0,
                    'images_seen': 0,
                    'device_hours': 0.0,
                    'images_per_s': None,
                    'knn_top1': _accuracy(knn, k) if knn else None,
                    'linear_top1': linear['top1'] if linear else None,
                    'linear_mode': linear['evaluator'] if linear else None,
                    'baseline': tag,
                }
            )
    return rows


def _points(summary: RunSummary, results: List[Dict], k: int) -> List[Dict]:
    """One point per evaluated checkpoint and evaluator: (device-hours, top-1)."""
    out = []
    for r in results:
        baseline = r['checkpoint']['tag'] in BASELINE_TAGS
        if r['checkpoint']['tag'] == 'pixels':
            continue
        pos = {'device_hours': 0.0, 'epoch': 0} if baseline else at_iteration(summary, r)
        acc = _accuracy(r, k)
        if acc is None or pos['device_hours'] is None:
            continue
        out.append(
            {
                'run': summary.run_name,
                'skipat': bool(summary.skipat),
                'evaluator': r['evaluator'],
                'iteration': 0 if baseline else r['checkpoint'].get('iteration'),
                'epoch': pos['epoch'],
                'device_hours': pos['device_hours'],
                'top1': acc,
                'device_hours_unit': summary.device_hours_unit,
            }
        )
    return sorted(out, key=lambda p: (p['run'], p['evaluator'], p['device_hours']))


def _compare(rows: List[Dict]) -> None:
    """SkipAt rows against the plain-ViT row of the same config_name: saving (%) and accuracy difference."""
    vit = {}
    for row in rows:
        if not row['skipat'] and 'baseline' not in row:
            if row['config_name'] in vit:
                raise EvalError(
                    f'two plain-ViT runs share config_name {row["config_name"]!r}: '
                    f'{vit[row["config_name"]]["run_dir"]} and {row["run_dir"]}; report one of them'
                )
            vit[row['config_name']] = row
    for row in rows:
        ref = vit.get(row['config_name'])
        if not row['skipat'] or 'baseline' in row or ref is None:
            continue
        row['compared_with'] = ref['run']
        if row['device_hours_unit'] == ref['device_hours_unit'] and row['device_hours'] and ref['device_hours']:
            row['device_hours_saving_pct'] = 100.0 * (ref['device_hours'] - row['device_hours']) / ref['device_hours']
        for key in ('knn_top1', 'linear_top1'):
            if row[key] is not None and ref[key] is not None:
                row[f'{key}_diff'] = row[key] - ref[key]


def _fmt(value, spec: str = '.2f', suffix: str = '') -> str:
    if value is None:
        return '—'
    return f'{value:{spec}}{suffix}' if isinstance(value, (int, float)) else str(value)


def markdown(report: Dict) -> str:
    k = report['k']
    lines = [
        '# SkipAt vs ViT: accuracy and training cost',
        '',
        f"k-NN: DINO's weighted k-NN, k={k}, T=0.07. Linear: DINO's linear probe (mode in brackets). "
        'Device-hours as measured by the trainer (GPU-hours on GPUs, core-hours on CPUs). Saving and '
        'differences: SkipAt run against the plain-ViT run of the same config.',
        '',
    ]
    for name, part in report['datasets'].items():
        lines += [
            f'## {name}',
            '',
            '| run | model | epochs | images seen | images/s | device-hours | k-NN top-1 | linear top-1 '
            '| saving vs ViT | Δ k-NN | Δ linear |',
            '|---|---|---|---|---|---|---|---|---|---|---|',
        ]
        for r in part['rows']:
            unit = {'GPU-hours': 'GPU-h', 'core-hours': 'core-h'}.get(r.get('device_hours_unit'), '')
            hours = f'{r["device_hours"]:.3g} {unit}'.strip() if r['device_hours'] is not None else '—'
            epochs = f'{_fmt(r["epochs"], "d")}/{_fmt(r["epochs_planned"], "d")}' if 'baseline' not in r else '0'
            linear = _fmt(r['linear_top1'])
            if r['linear_mode']:
                linear += f' ({"augment" if r["linear_mode"] == "linear_augment" else "cached"})'
            lines.append(
                f'| {r["run"]} | {r["model"]}{" (SkipAt)" if r["skipat"] else ""} | {epochs} | '
                f'{_fmt(r["images_seen"], ",")} | {_fmt(r["images_per_s"], ".1f")} | {hours} | {_fmt(r["knn_top1"])} | '
                f'{linear} | {_fmt(r.get("device_hours_saving_pct"), "+.1f", "%")} | '
                f'{_fmt(r.get("knn_top1_diff"), "+.2f")} | {_fmt(r.get("linear_top1_diff"), "+.2f")} |'
            )
        lines.append('')
    return '\n'.join(lines)


def plot(report: Dict, path: Path) -> Optional[Path]:
    """Top-1 against device-hours, one line per run and evaluator, one point per checkpoint."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    parts = [(name, part) for name, part in report['datasets'].items() if part['points']]
    if not parts:
        return None
    fig, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 4.8), squeeze=False)
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for ax, (name, part) in zip(axes[0], parts):
        runs = sorted({p['run'] for p in part['points']})
        units = {p['device_hours_unit'] for p in part['points'] if p['device_hours_unit']}
        for i, run in enumerate(runs):
            for evaluator, style in (('knn', '-'), ('linear', '--'), ('linear_augment', ':')):
                pts = [p for p in part['points'] if p['run'] == run and p['evaluator'] == evaluator]
                if not pts:
                    continue
                skipat = pts[0]['skipat']
                ax.plot(
                    [p['device_hours'] for p in pts],
                    [p['top1'] for p in pts],
                    style,
                    marker='*' if skipat else 'o',
                    markersize=10 if skipat else 6,
                    color=colours[i % len(colours)],
                    label=f'{run}{" (SkipAt)" if skipat else ""}: {evaluator.replace("_", " ")}',
                )
        ax.set_xlabel(' / '.join(sorted(units)) or 'device-hours')
        ax.set_ylabel('top-1 (%)')
        ax.set_title(f'{name}: k-NN (k={report["k"]}) and linear top-1')
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=120)
    plt.close(fig)
    return path


def write_report(
    run_dirs: List[os.PathLike], out_dir: Optional[os.PathLike] = None, k: int = 20, dataset: Optional[str] = None
) -> Dict[str, Path]:
    """report.md, report.json and report.png in ``out_dir`` (default: {common parent of the runs}/report)."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise EvalError('name at least one run folder')
    report = collect(run_dirs, k, dataset)
    out = Path(out_dir) if out_dir else Path(os.path.commonpath([str(d.resolve()) for d in run_dirs])) / 'report'
    if len(run_dirs) == 1 and not out_dir:
        out = run_dirs[0] / 'report'
    writable_dir(out, 'report folder')
    paths = {'md': out / 'report.md', 'json': out / 'report.json'}
    atomic_write_text(markdown(report), paths['md'])
    atomic_write_json(report, paths['json'], indent=1)
    png = plot(report, out / 'report.png')
    if png is not None:
        paths['png'] = png
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='skipssl-report', description=__doc__.split('\n')[0])
    p.add_argument('run_dirs', nargs='+', help='training run folders (summary.json and eval/*.json)')
    p.add_argument('--out-dir', help='default: RUN/report for one run, else {common parent}/report')
    p.add_argument('--k', type=int, default=20, help="k of the k-NN column (DINO's headline: 20)")
    p.add_argument('--dataset', help='only this dataset')
    args = p.parse_args(argv)
    try:
        paths = write_report(args.run_dirs, args.out_dir, args.k, args.dataset)
    except EvalError as exn:
        print(f'{p.prog}: error: {exn}', file=sys.stderr)
        return 2
    print(paths['md'].read_text())
    print('\n'.join(f'wrote {p}' for p in paths.values()), file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Accuracy against training cost, SkipAt against plain ViT: a Markdown + JSON table and a PNG plot.

    skipssl-report runs/dino_fmnist_tiny_vit runs/dino_fmnist_tiny_skipat [--k 20] [--out-dir reports/x]

For each run folder: ``summary.json`` (written by the trainer) and the evaluators' ``eval/*.json``. One row per
run and dataset, at the newest evaluated checkpoint: model, epochs, images seen, images/s, device-hours
(measured by the trainer; GPU-hours on GPUs, core-hours on CPUs), k-NN top-1 (at --k) and linear top-1
(DINO's augmented protocol where it was run, else on cached features), seed and attention kind (the run's
``config.yaml``; ``fused`` where it does not say). Random-init baselines get rows of their own.

Runs whose ``config.yaml`` differ only in ``experiment.seed`` (and ``experiment.output_dir``), pretrained on the
same data, form a group: one row with the mean and sample standard deviation of each figure over its seeds.
A SkipAt group is compared with the plain-ViT group of the same ``config_name`` pretrained on the same data
(the runs' data fingerprints; by ``data.train_shards`` with a note where a run predates them), of the same
attention kind where there is one (else with a note): device-hour saving (%) and the accuracy difference
(points) with its 95% confidence interval, paired by seed where both groups ran the same seeds, else Welch's
(stats.py; docs/demo.md says why). Each SkipAt run is also compared with the ViT run of its seed. The plot has
one point per group and evaluated checkpoint (accuracy against device-hours, mean with standard-deviation
bars over seeds), as in the SkipAt paper's DINO figure.
"""

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from skipssl.failure import first_line
from skipssl_common.artefacts import SUMMARY_FILE, ArtefactError, RunSummary
from skipssl_common.io import atomic_path, atomic_write_json, atomic_write_text

from .errors import EvalError
from .results import read_results, writable_dir
from .stats import Difference, Spread, paired_interval, spread, welch_interval

BASELINE_TAGS = ('random-init', 'pixels')
LINEAR_EVALUATORS = ('linear_augment', 'linear')  # preferred first
CONFIG_FILE = 'config.yaml'
DEFAULT_ATTENTION = 'fused'  # what a config without model.attention ran: timm's fused attention
SHORT_UNITS = {'GPU-hours': 'GPU-h', 'core-hours': 'core-h'}
GROUP_FIGURES = ('knn_top1', 'linear_top1', 'device_hours')  # the figures a group row spreads over its seeds


@dataclass(frozen=True)
class RunConfig:
    """What the report reads from a run's config.yaml. A run folder without one forms a group of its own, its
    seed and training data unknown."""

    seed: Optional[int]
    attention: str
    train_shards: Optional[str]
    group_key: str  # the config without experiment.seed and experiment.output_dir, as canonical JSON


def read_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return RunConfig(None, DEFAULT_ATTENTION, None, f'no {CONFIG_FILE}: {Path(run_dir).resolve()}')
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exn:
        raise EvalError(f'{path} is unreadable: {first_line(exn)}') from exn
    sections = ('experiment', 'model', 'data')
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(s) or {}, dict) for s in sections):
        raise EvalError(f'{path} is not a run config (a mapping of sections)')
    experiment = dict(cfg.get('experiment') or {})
    seed = experiment.pop('seed', None)
    experiment.pop('output_dir', None)
    attention = (cfg.get('model') or {}).get('attention', DEFAULT_ATTENTION)
    shards = (cfg.get('data') or {}).get('train_shards')
    return RunConfig(
        seed if isinstance(seed, int) else None,
        str(attention),
        None if shards is None else str(shards),
        json.dumps({**cfg, 'experiment': experiment}, sort_keys=True, default=str),
    )


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
        runs.append((Path(run_dir), load_summary(run_dir), read_run_config(Path(run_dir)), read_results(run_dir)))
    _label_datasets([r for *_, results in runs for r in results])
    runs = [
        (d, summary, config, [r for r in results if dataset in (None, r['dataset'], r['_dataset'])])
        for d, summary, config, results in runs
    ]
    datasets = sorted({r['_dataset'] for *_, results in runs for r in results})
    if dataset is not None and not datasets:
        raise EvalError(f'no evaluation results for dataset {dataset!r} in {[str(d) for d in run_dirs]}')
    report = {
        'k': k,
        'generated': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'runs': [str(d) for d in run_dirs],
        'datasets': {},
    }
    keys = {str(d): (config.group_key, summary.data_fingerprint) for d, summary, config, _ in runs}
    for name in datasets:
        rows, points = [], []
        for run_dir, summary, config, results in runs:
            mine = [r for r in results if r['_dataset'] == name]
            rows += _rows(run_dir, summary, config, mine, k)
            points += _points(summary, mine, k)
        groups = _groups(rows, keys)
        pairs, notes = _pair(groups)
        _compare(groups, pairs)
        group_of = {r['run']: g.label for g in groups for r in g.rows}
        for p in points:
            p['group'] = group_of.get(p['run'], p['run'])
        report['datasets'][name] = {
            'rows': rows,
            'groups': [_group_row(g, pairs.get(g.label)) for g in groups],
            'notes': notes,
            'points': points,
        }
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


def _rows(run_dir: Path, summary: RunSummary, config: RunConfig, results: List[Dict], k: int) -> List[Dict]:
    trained = [r for r in results if r['checkpoint']['tag'] not in BASELINE_TAGS]
    base = {
        'run': summary.run_name,
        'run_dir': str(run_dir),
        'model': summary.model['name'],
        'skipat': bool(summary.skipat),
        'attention': config.attention,
        'seed': config.seed,
        'data_fingerprint': summary.data_fingerprint,
        'train_shards': config.train_shards,
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


@dataclass(frozen=True)
class Group:
    """The trained rows of runs that differ only in their seed (and run folder), ordered by seed, and what
    those runs share."""

    label: str
    rows: List[Dict]
    skipat: bool
    model: str
    attention: str
    config_name: str
    data_fingerprint: Optional[str]
    train_shards: Optional[str]

    @classmethod
    def of(cls, rows: List[Dict]) -> 'Group':
        rows = sorted(rows, key=lambda r: (r['seed'] is None, r['seed'] or 0))
        first = rows[0]
        shared = ('skipat', 'model', 'attention', 'config_name', 'data_fingerprint', 'train_shards')
        return cls(', '.join(r['run'] for r in rows), rows, *(first[k] for k in shared))

    @property
    def seeds(self) -> List[Optional[int]]:
        return [r['seed'] for r in self.rows]


def _groups(rows: List[Dict], keys: Dict[str, Tuple[str, Optional[str]]]) -> List[Group]:
    """The trained rows grouped by their run's config (seed and run folder left out) and data fingerprint."""
    by_key: Dict[Tuple[str, Optional[str]], List[Dict]] = {}
    for row in rows:
        if 'baseline' not in row:
            by_key.setdefault(keys[row['run_dir']], []).append(row)
    groups = [Group.of(members) for members in by_key.values()]
    for g in groups:
        for r in g.rows:
            r['group'] = g.label
    return groups


def _same_data(g: Group, v: Group) -> Tuple[bool, Optional[str]]:
    """Whether SkipAt group ``g`` and ViT group ``v`` were pretrained on the same data, and the note to print."""
    if g.data_fingerprint and v.data_fingerprint:
        if g.data_fingerprint == v.data_fingerprint:
            return True, None
        return False, (
            f'{g.label} is not compared with {v.label}: they were pretrained on different data '
            f'(data fingerprints {g.data_fingerprint[:12]} and {v.data_fingerprint[:12]})'
        )
    missing = _which([x for x in (g, v) if not x.data_fingerprint])
    if g.train_shards is None or v.train_shards is None:
        return True, (
            f'{g.label} is compared with {v.label}, but the data identity is unknown '
            f'({missing}: no data fingerprint; {_which([x for x in (g, v) if x.train_shards is None])}: '
            f'no {CONFIG_FILE})'
        )
    if g.train_shards != v.train_shards:
        return False, (
            f'{g.label} is not compared with {v.label}: they were pretrained on different data.train_shards '
            f'({g.train_shards} and {v.train_shards})'
        )
    return True, (
        f'{g.label} is compared with {v.label} by data.train_shards ({g.train_shards}): the data identity is '
        f'unknown ({missing}: no data fingerprint)'
    )


def _which(groups: List[Group]) -> str:
    return 'both' if len(groups) == 2 else groups[0].label


def _pair(groups: List[Group]) -> Tuple[Dict[str, Group], List[str]]:
    """Each SkipAt group's plain-ViT group: same config_name, same data, the same attention kind where there is
    one. Returns {SkipAt group label: ViT group} and one-line notes on what was not paired, or paired with a
    caveat."""
    pairs: Dict[str, Group] = {}
    notes: List[str] = []
    for g in groups:
        if not g.skipat:
            continue
        same_data = []
        for v in groups:
            if v.skipat or v.config_name != g.config_name:
                continue
            ok, note = _same_data(g, v)
            if ok:
                same_data.append((v, note))
            elif note:
                notes.append(note)
        candidates = [(v, n) for v, n in same_data if v.attention == g.attention] or same_data
        if len(candidates) > 1:
            a, b = (v.rows[0]['run_dir'] for v, _ in candidates[:2])
            raise EvalError(
                f'two plain-ViT runs share config_name {g.config_name!r} and their data but differ in more than '
                f'their seed: {a} and {b}; report one of them'
            )
        if not candidates:
            continue
        v, note = candidates[0]
        pairs[g.label] = v
        if note:
            notes.append(note)
        if v.attention != g.attention:
            notes.append(
                f'{g.label} ({g.attention} attention) is compared with {v.label} ({v.attention} attention): '
                "its device-hour saving mixes SkipAt's with the attention kernel's"
            )
    return pairs, notes


def _compare(groups: List[Group], pairs: Dict[str, Group]) -> None:
    """Each SkipAt run against the run of its seed in the paired ViT group (that group's one run if it has no
    such seed): saving (%) and accuracy difference."""
    for g in groups:
        v = pairs.get(g.label)
        if v is None:
            continue
        by_seed = {r['seed']: r for r in v.rows if r['seed'] is not None}
        for row in g.rows:
            ref = by_seed.get(row['seed']) or (v.rows[0] if len(v.rows) == 1 else None)
            if ref is None:
                continue
            row['compared_with'] = ref['run']
            if row['device_hours_unit'] == ref['device_hours_unit'] and row['device_hours'] and ref['device_hours']:
                row['device_hours_saving_pct'] = (
                    100.0 * (ref['device_hours'] - row['device_hours']) / ref['device_hours']
                )
            for key in ('knn_top1', 'linear_top1'):
                if row[key] is not None and ref[key] is not None:
                    row[f'{key}_diff'] = row[key] - ref[key]


def _paired(g: Group, v: Group) -> bool:
    """Whether the two groups ran the same seeds: then SkipAt and ViT saw the same data order and crops per seed
    and the seeds are the units of a paired comparison."""
    seeds, ref = g.seeds, v.seeds
    return None not in seeds and len(set(seeds)) == len(seeds) and sorted(seeds) == sorted(ref)


def difference(g: Group, v: Group, key: str) -> Difference:
    """Mean of ``key`` in SkipAt group ``g`` minus ViT group ``v``, with its 95% interval."""
    if _paired(g, v):
        ref = {r['seed']: r[key] for r in v.rows}
        pairs = [(r[key], ref[r['seed']]) for r in g.rows if r[key] is not None and ref[r['seed']] is not None]
        return paired_interval([a for a, _ in pairs], [b for _, b in pairs])
    values = [[r[key] for r in x.rows if r[key] is not None] for x in (g, v)]
    return welch_interval(values[0], values[1])


def _group_row(g: Group, v: Optional[Group]) -> Dict[str, Any]:
    units = {r['device_hours_unit'] for r in g.rows}
    row: Dict[str, Any] = {
        'group': g.label,
        'runs': [r['run'] for r in g.rows],
        'seeds': g.seeds,
        'n': len(g.rows),
        'model': g.model,
        'skipat': g.skipat,
        'attention': g.attention,
        'config_name': g.config_name,
        'data_fingerprint': g.data_fingerprint,
        'device_hours_unit': units.pop() if len(units) == 1 else None,
    }
    for key in GROUP_FIGURES:
        row[key] = asdict(spread([r[key] for r in g.rows if r[key] is not None]))
    if v is None:
        return row
    row['compared_with'] = v.label
    same_unit = row['device_hours_unit'] is not None and {r['device_hours_unit'] for r in v.rows} == {
        row['device_hours_unit']
    }
    for key in GROUP_FIGURES:
        if key != 'device_hours' or same_unit:
            row[f'{key}_diff'] = asdict(difference(g, v, key))
    ref_hours = spread([r['device_hours'] for r in v.rows if r['device_hours']]).mean
    if same_unit and ref_hours and row['device_hours']['mean']:
        row['device_hours_saving_pct'] = 100.0 * (ref_hours - row['device_hours']['mean']) / ref_hours
    return row


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
        'differences: SkipAt run against the plain-ViT run of the same config and seed. Over seeds: runs whose '
        'configs differ only in their seed, mean ± sample standard deviation; Δ: SkipAt minus ViT with its 95% '
        "confidence interval (paired by seed where both ran the same seeds, else Welch's).",
        '',
    ]
    for name, part in report['datasets'].items():
        lines += [
            f'## {name}',
            '',
            '| run | model | attention | seed | epochs | images seen | images/s | device-hours | k-NN top-1 '
            '| linear top-1 | saving vs ViT | Δ k-NN | Δ linear |',
            '|---|---|---|---|---|---|---|---|---|---|---|---|---|',
        ]
        for r in part['rows']:
            unit = SHORT_UNITS.get(r.get('device_hours_unit'), '')
            hours = f'{r["device_hours"]:.3g} {unit}'.strip() if r['device_hours'] is not None else '—'
            epochs = f'{_fmt(r["epochs"], "d")}/{_fmt(r["epochs_planned"], "d")}' if 'baseline' not in r else '0'
            linear = _fmt(r['linear_top1'])
            if r['linear_mode']:
                linear += f' ({"augment" if r["linear_mode"] == "linear_augment" else "cached"})'
            lines.append(
                f'| {r["run"]} | {r["model"]}{" (SkipAt)" if r["skipat"] else ""} | {r["attention"]} | '
                f'{_fmt(r["seed"], "d")} | {epochs} | {_fmt(r["images_seen"], ",")} | '
                f'{_fmt(r["images_per_s"], ".1f")} | {hours} | {_fmt(r["knn_top1"])} | '
                f'{linear} | {_fmt(r.get("device_hours_saving_pct"), "+.1f", "%")} | '
                f'{_fmt(r.get("knn_top1_diff"), "+.2f")} | {_fmt(r.get("linear_top1_diff"), "+.2f")} |'
            )
        lines.append('')
        if part['groups']:
            lines += [
                'Over seeds:',
                '',
                '| runs | model | attention | seeds | k-NN top-1 | linear top-1 | device-hours | saving vs ViT '
                '| Δ k-NN (95% CI) | Δ linear (95% CI) |',
                '|---|---|---|---|---|---|---|---|---|---|',
            ]
            for g in part['groups']:
                unit = SHORT_UNITS.get(g['device_hours_unit'], '')
                lines.append(
                    f'| {g["group"]} | {g["model"]}{" (SkipAt)" if g["skipat"] else ""} | {g["attention"]} | '
                    f'{", ".join(_fmt(x, "d") for x in g["seeds"])} | {_spread(g["knn_top1"])} | '
                    f'{_spread(g["linear_top1"])} | {_spread(g["device_hours"], ".3g", f" {unit}".rstrip())} | '
                    f'{_fmt(g.get("device_hours_saving_pct"), "+.1f", "%")} | {_difference(g.get("knn_top1_diff"))} | '
                    f'{_difference(g.get("linear_top1_diff"))} |'
                )
            lines.append('')
        lines += [f'- {note}' for note in part['notes']] + ([''] if part['notes'] else [])
    return '\n'.join(lines)


def _spread(s: Dict, spec: str = '.2f', suffix: str = '') -> str:
    """mean ± std (n), or the value alone for one seed."""
    if s['mean'] is None:
        return '—'
    if s['std'] is None:
        return f'{s["mean"]:{spec}}{suffix}'
    return f'{s["mean"]:{spec}} ± {s["std"]:{spec}}{suffix} (n={s["n"]})'


def _difference(d: Optional[Dict]) -> str:
    """estimate [low, high] (method, n), or the estimate and why there is no interval."""
    if d is None or d['estimate'] is None:
        return '—'
    n = f'{d["n"][0]} pairs' if d['method'] == 'paired' else f'n={d["n"][0]}+{d["n"][1]}'
    if d['unavailable']:
        return f'{d["estimate"]:+.2f} (no interval: {d["unavailable"]})'
    return f'{d["estimate"]:+.2f} [{d["low"]:+.2f}, {d["high"]:+.2f}] ({d["method"]}, {n})'


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
        groups = sorted({p['group'] for p in part['points']})
        units = {p['device_hours_unit'] for p in part['points'] if p['device_hours_unit']}
        for i, group in enumerate(groups):
            for evaluator, style in (('knn', '-'), ('linear', '--'), ('linear_augment', ':')):
                pts = [p for p in part['points'] if p['group'] == group and p['evaluator'] == evaluator]
                if not pts:
                    continue
                skipat = pts[0]['skipat']
                # one point per checkpoint: the mean over the group's seeds, bars of one standard deviation
                at = [spread_at(pts, it) for it in sorted({p['iteration'] for p in pts})]
                ax.errorbar(
                    [x.mean for x, _ in at],
                    [y.mean for _, y in at],
                    xerr=[x.std or 0.0 for x, _ in at],
                    yerr=[y.std or 0.0 for _, y in at],
                    fmt=style,
                    marker='*' if skipat else 'o',
                    markersize=10 if skipat else 6,
                    capsize=3,
                    color=colours[i % len(colours)],
                    label=f'{group}{" (SkipAt)" if skipat else ""}: {evaluator.replace("_", " ")}',
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


def spread_at(points: List[Dict], iteration: int) -> Tuple[Spread, Spread]:
    """(device-hours, top-1) over the points of one checkpoint iteration (one per seed)."""
    at = [p for p in points if p['iteration'] == iteration]
    return spread([p['device_hours'] for p in at]), spread([p['top1'] for p in at])


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

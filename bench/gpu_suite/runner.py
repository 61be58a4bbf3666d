"""Runs the stages in order, each in its own process group under its own wall-clock cap, within one total
budget; writes ``{out}/{stage}.json`` per stage and ``{out}/summary.json``.

A stage's cap is its share of the budget (sizes.STAGE_SECONDS, scaled to --budget) plus whatever earlier
stages left unused; a stage with less than MIN_STAGE_SECONDS left is recorded as skipped. At its cap the
stage's whole process group (pretrain.py runs, data-loader workers, compile workers) gets SIGTERM, then
SIGKILL: a hung NCCL start or a runaway compile costs its own cap and nothing more. A failed stage records
its error and traceback, and the suite goes on.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

from .record import read_json, write_json
from .sizes import MIN_STAGE_SECONDS, MODES, STAGE_SECONDS
from .stages import TITLES

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / 'bench' / 'results' / 'gpu_suite'
DEFAULT_BUDGET = float(sum(STAGE_SECONDS.values()))
DRY_BUDGET = 600.0  # about 75 s of CPU time; the rest is room for a CI machine that others load
LOG_TAIL_CHARS = 6000
CHILD_LOG_TAIL_CHARS = 2500
KILL_GRACE_S = 5.0


def device_label(mode: str) -> str:
    """The machine in words, without starting CUDA in this process (a context here would hold device memory
    for the whole suite)."""
    from bench.knn_throughput import cpu_name

    cpu = f'{cpu_name()} ({os.cpu_count()} cores)'
    if mode == 'gpu':
        try:
            out = subprocess.run(
                ['nvidia-smi', '--query-gpu=name', '--format=csv,noheader'], capture_output=True, text=True, timeout=20
            )
            if out.returncode == 0 and out.stdout.strip():
                return f'{out.stdout.strip().splitlines()[0]}; {cpu}'
        except (OSError, subprocess.TimeoutExpired):
            pass
    return cpu


def stage_caps(budget: float) -> Dict[str, float]:
    scale = budget / DEFAULT_BUDGET
    return {name: seconds * scale for name, seconds in STAGE_SECONDS.items()}


def kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(name: str, mode: str, cap: float, work: Path, out: Path) -> Dict:
    """One stage in a new session (its own process group), killed as a group at ``cap`` seconds."""
    partial, error, log = work / f'{name}.partial.json', work / f'{name}.error.json', work / f'{name}.log'
    for path in (partial, error):
        path.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        '-m',
        'bench.gpu_suite.stages',
        name,
        '--mode',
        mode,
        '--work',
        str(work),
        '--results',
        str(out),
        '--partial',
        str(partial),
        '--error',
        str(error),
    ]
    env = dict(
        os.environ,
        PYTHONUNBUFFERED='1',
        PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]),
    )
    env.setdefault('TORCHINDUCTOR_CACHE_DIR', str(work / 'inductor'))
    t0 = time.perf_counter()
    with open(log, 'w') as log_file:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:  # the kill's grace period comes out of the cap, so a stage never takes from the next one's
            rc: Optional[int] = proc.wait(timeout=max(cap - KILL_GRACE_S, 0.1))
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            kill_group(proc)  # the stage's leftovers too (a pretrain.py run it had started), or it on time-out
    wall = time.perf_counter() - t0
    failure = read_json(error)
    status = 'timeout' if rc is None else ('ok' if rc == 0 else 'failed')
    if status == 'timeout':
        failure = {'error': f'time cap of {cap:.0f} s reached: process group killed', 'traceback': None}
    elif status == 'failed' and not failure:
        failure = {'error': f'stage process exited with status {rc} (killed: {rc < 0})', 'traceback': None}
    result = {
        'status': status,
        'wall_s': round(wall, 2),
        'cap_s': round(cap, 1),
        'returncode': rc,
        'error': failure.get('error'),
        'traceback': failure.get('traceback'),
        'measurements': read_json(partial),
        'log_tail': log.read_text(errors='replace')[-LOG_TAIL_CHARS:] if log.exists() else '',
    }
    if status != 'ok':  # where the processes it had started were (pretrain.py runs log to files of their own)
        result['child_log_tails'] = {
            p.name: p.read_text(errors='replace')[-CHILD_LOG_TAIL_CHARS:] for p in sorted((work / name).glob('*.log'))
        }
    return result


def run_suite(mode: str, out: Path, work: Path, budget: float, only: Optional[List[str]] = None) -> Dict:
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    device = device_label(mode)
    caps = stage_caps(budget)
    names = [n for n in caps if only is None or n in only or n == 'prepare']
    t_start = time.perf_counter()
    summary = {
        'suite': 'bench.gpu_suite',
        'mode': mode,
        'device': device,
        'date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'budget_s': budget,
        'sizes': MODES[mode].__dict__,
        'stages': {},
    }
    for i, name in enumerate(names):
        remaining = budget - (time.perf_counter() - t_start)
        later = sum(caps[n] for n in names[i + 1 :])
        cap = min(remaining, max(caps[name], remaining - later))
        print(f'[gpu_suite] {name}: cap {cap:.0f} s, {remaining:.0f} s left', flush=True)
        if cap < MIN_STAGE_SECONDS:
            result = {
                'status': 'skipped',
                'wall_s': 0.0,
                'cap_s': round(cap, 1),
                'error': f'{remaining:.0f} s of the {budget:.0f} s budget left: not started',
                'traceback': None,
                'measurements': {},
            }
        else:
            result = run_stage(name, mode, cap, work, out)
        record = {'stage': name, 'title': TITLES[name], 'device': device, 'mode': mode, **result}
        if name != 'prepare':  # prepare's record goes into the summary: $OUT brings back 8 files at most
            write_json(record, out / f'{name}.json')
        summary['stages'][name] = (
            {k: record[k] for k in ('status', 'wall_s', 'cap_s', 'error')} if name != 'prepare' else record
        )
        print(
            f'[gpu_suite] {name}: {result["status"]} in {result["wall_s"]:.1f} s'
            + (f' ({result["error"].splitlines()[0][:200]})' if result.get('error') else ''),
            flush=True,
        )
    summary['wall_s'] = round(time.perf_counter() - t_start, 1)
    summary['ok'] = all(s['status'] == 'ok' for s in summary['stages'].values())
    write_json(summary, out / 'summary.json')
    print(
        f'[gpu_suite] {"all stages ok" if summary["ok"] else "some stages not ok"} in {summary["wall_s"]:.0f} s '
        f'-> {out}',
        flush=True,
    )
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='python -m bench.gpu_suite', description=__doc__.split('\n')[0])
    p.add_argument('--dry-run', action='store_true', help='every stage on the CPU with tiny sizes (CI)')
    p.add_argument('--out', type=Path, default=None, help=f'result folder (default {DEFAULT_OUT}/<mode>)')
    p.add_argument(
        '--work',
        type=Path,
        default=None,
        help='scratch folder: shards, runs, logs (default: a temporary folder, removed at the end)',
    )
    p.add_argument(
        '--budget',
        type=float,
        default=None,
        help=f'total seconds (default {DEFAULT_BUDGET:.0f} on the GPU, {DRY_BUDGET:.0f} for --dry-run)',
    )
    p.add_argument(
        '--stages',
        nargs='+',
        choices=[n for n in STAGE_SECONDS if n != 'prepare'],
        help='only these (prepare always runs)',
    )
    args = p.parse_args(argv)
    mode = 'dry' if args.dry_run else 'gpu'
    if mode == 'gpu' and not _has_cuda():
        print('python -m bench.gpu_suite: no CUDA device here; --dry-run runs every stage on the CPU', file=sys.stderr)
        return 2
    out = args.out or DEFAULT_OUT / mode
    budget = args.budget or (DEFAULT_BUDGET if mode == 'gpu' else DRY_BUDGET)
    if args.work:
        summary = run_suite(mode, out, args.work, budget, args.stages)
    else:
        with tempfile.TemporaryDirectory(prefix='gpu_suite_') as tmp:
            summary = run_suite(mode, out, Path(tmp), budget, args.stages)
    return 0 if summary['ok'] else 1


def _has_cuda() -> bool:
    try:
        return subprocess.run(['nvidia-smi', '-L'], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False

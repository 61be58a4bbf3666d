"""Where results go: ``{run}/eval/{evaluator}-{tag}-{dataset}-{data}.json`` and scalars in the run's TensorBoard.

tag: the checkpoint's 8-digit iteration, 'random-init', 'pixels', or a digest prefix for an export that does
not say its iteration. data: the first 8 hex digits of the content digest of the shards the result was
computed on (train, test and val), so a result on other data under the same names (a relabelled test set)
never overwrites it; the file records the full digest. TensorBoard: the evaluator's own events file in
``{run}/tb`` (next to the trainer's),
scalars ``eval/{evaluator}/{dataset}/{name}`` at the checkpoint's iteration (0 for baselines), so they line up
with the training curves.
"""

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

from skipssl_common.io import atomic_write_json

from .errors import EvalError
from .source import ModelInfo

_SAFE = re.compile(r'[^A-Za-z0-9_.-]')


def result_dir(info: ModelInfo, out_dir: Optional[str]) -> Path:
    """--out-dir, else the run's eval/, else eval/ beside the checkpoint file or folder."""
    if out_dir:
        return Path(out_dir)
    if info.run_dir:
        return Path(info.run_dir) / 'eval'
    if info.path:
        return Path(info.path).parent / 'eval'
    raise EvalError(f'{info.spec}: say where results go (--run-dir RUN or --out-dir DIR)')


def writable_dir(folder: Path, what: str) -> Path:
    """``folder``, created if needed; EvalError naming it when it cannot be created or written into."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exn:
        raise EvalError(f'{what} {folder} cannot be created: {exn.strerror or exn}') from exn
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EvalError(f'{what} {folder} is not writable')
    return folder


def tb_dir(info: ModelInfo, results: Path) -> Path:
    return Path(info.run_dir) / 'tb' if info.run_dir else results / 'tb'


def result_path(results: Path, evaluator: str, tag: str, dataset: str, data_digest: str) -> Path:
    return results / f'{evaluator}-{_SAFE.sub("_", tag)}-{_SAFE.sub("_", dataset)}-{data_digest[:8]}.json'


def write_result(results: Path, evaluator: str, info: ModelInfo, dataset: str, data_digest: str, payload: Dict) -> Path:
    record = {
        'evaluator': evaluator,
        'dataset': dataset,
        'checkpoint': info.as_dict(),
        'date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        **payload,
        'data_digest': data_digest,
    }
    path = result_path(results, evaluator, info.tag, dataset, data_digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, path, indent=1)
    return path


def log_scalars(tb: Path, evaluator: str, dataset: str, scalars: Dict[str, float], step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tb), filename_suffix=f'.{evaluator}')
    try:
        for name, value in scalars.items():
            writer.add_scalar(f'eval/{evaluator}/{dataset}/{name}', value, global_step=step)
    finally:
        writer.close()


def read_results(run_dir: Path, evaluator: Optional[str] = None) -> List[Dict]:
    """Every result JSON in ``{run}/eval/`` (of one evaluator if named)."""
    folder = Path(run_dir) / 'eval'
    pattern = f'{evaluator}-*.json' if evaluator else '*.json'
    out = []
    for path in sorted(folder.glob(pattern)) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exn:
            raise EvalError(f'result file {path} is unreadable: {exn}') from exn
        if 'evaluator' in record:
            record['_path'] = str(path)
            out.append(record)
    return out

"""The files one stage leaves for the next, as typed, versioned records: a run's ``summary.json`` (trainer ->
report, evaluators, demo, launch) and an exported backbone's metadata (trainer -> evaluators), with the format
names of the shard index. Each record carries its format name; a reader refuses another format (or version) in
one line, and files written before the name was recorded are read as version 1.
"""

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from .io import PathLike, atomic_write_json

SHARD_INDEX_FORMAT = 'skipssl-shards/1'  # {prefix}-index.json: make_shards and the synthetic writers
BACKBONE_FORMAT = 'skipssl-backbone/1'  # safetensors metadata of an exported backbone
SUMMARY_FORMAT = 'skipssl-run-summary/1'  # {run}/summary.json
SUMMARY_FILE = 'summary.json'


class ArtefactError(ValueError):
    """A file that is not the record it should be: wrong format, missing fields."""


def _check(record: Mapping[str, Any], fmt: str, required: List[str], where: str) -> None:
    found = record.get('format', fmt)
    if found != fmt:
        raise ArtefactError(f'{where} is format {found!r}, expected {fmt!r}')
    missing = [k for k in required if k not in record]
    if missing:
        raise ArtefactError(f'{where} lacks {missing}')


def _known(cls, record: Mapping[str, Any]) -> Dict[str, Any]:
    """The fields of ``cls`` found in ``record`` (fields added by later writers are ignored)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in record.items() if k in names}


@dataclass
class RunSummary:
    """What a training run did, written by rank 0 when it stops (finished or not)."""

    run_name: str
    model: Dict[str, Any]  # {'name': timm model name, 'kwargs': {...}}
    skipat: bool  # asked of the built model, not guessed from its name
    config_name: str
    epochs_planned: Optional[int] = None
    epochs_done: Optional[int] = None
    iterations: Optional[int] = None
    iterations_planned: Optional[int] = None
    global_batch: Optional[int] = None
    images_seen: Optional[int] = None
    images_per_s: Optional[float] = None
    device: Dict[str, Any] = field(default_factory=dict)  # kind, world_size, name, threads_per_rank
    device_hours: Optional[float] = None
    device_hours_unit: Optional[str] = None
    per_epoch: List[Dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    finished: bool = False
    stopped_by: Optional[str] = None  # the signal that stopped an unfinished run, if any
    format: str = SUMMARY_FORMAT
    data_fingerprint: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], where: str = SUMMARY_FILE) -> 'RunSummary':
        _check(record, SUMMARY_FORMAT, ['run_name', 'model', 'skipat', 'config_name'], where)
        return cls(**_known(cls, record))

    def write(self, run_dir: PathLike) -> Path:
        path = Path(run_dir) / SUMMARY_FILE
        atomic_write_json(self.to_dict(), path, indent=1)
        return path

    @classmethod
    def read(cls, run_dir: PathLike) -> 'RunSummary':
        """The summary of ``run_dir``; OSError when there is none, ArtefactError when it is not one."""
        path = Path(run_dir) / SUMMARY_FILE
        try:
            record = json.loads(path.read_text())
        except ValueError as exn:
            raise ArtefactError(f'{path} is unreadable: {exn}') from exn
        if not isinstance(record, dict):
            raise ArtefactError(f'{path} is unreadable: not a JSON object')
        return cls.from_dict(record, str(path))


# metadata values are strings: these are stored as they are, every other value JSON-encoded
_RAW = ('format', 'model_name', 'run_dir', 'device_hours_unit')


@dataclass(kw_only=True)
class Provenance:
    """Where in a run a set of weights comes from, and the preprocessing it was trained with (keyword-only, so
    records that add their own positional fields can share it)."""

    iteration: Optional[int] = None
    epoch: Optional[int] = None
    images_seen: Optional[int] = None
    device_hours: Optional[float] = None
    device_hours_unit: Optional[str] = None
    run_dir: Optional[str] = None
    data: Dict[str, Any] = field(default_factory=dict)  # channels, mean, std, eval_resize, eval_crop


@dataclass
class ExportMeta(Provenance):
    """What rebuilds an exported backbone and places it in its run: stored as the safetensors file's metadata."""

    model_name: str
    model_kwargs: Dict[str, Any]
    format: str = BACKBONE_FORMAT

    def to_metadata(self) -> Dict[str, str]:
        """The safetensors metadata: one string per key, the data settings at the top level."""
        flat = {k: v for k, v in asdict(self).items() if k != 'data'}
        flat.update(self.data)
        # unknown values are left out (read back as None), not written as the string 'null'
        return {
            k: v if k in _RAW else json.dumps(v, sort_keys=k == 'model_kwargs')
            for k, v in flat.items()
            if v is not None
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], where: str) -> 'ExportMeta':
        """Parsed from an export's metadata; ArtefactError naming ``where`` if it is not a skipssl export.
        Keys this version does not know are the data settings (written at the top level)."""
        if metadata.get('format') != BACKBONE_FORMAT:
            raise ArtefactError(
                f'{where} is not a skipssl backbone export (metadata format '
                f'{metadata.get("format")!r}, expected {BACKBONE_FORMAT!r})'
            )
        _check(metadata, BACKBONE_FORMAT, ['model_name', 'model_kwargs'], where)
        values = {k: v if k in _RAW else _parse(v) for k, v in metadata.items()}
        known = _known(cls, values)
        data = {k: v for k, v in values.items() if k not in known and k != 'data'}
        return cls(**known, data=data)


def _parse(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value

"""A stage's measurements, rewritten to disk after each one, so a stage killed at its time cap still leaves
what it had measured."""

import json
from pathlib import Path
from typing import Any, Dict

from skipssl_common.io import atomic_write_json


def write_json(obj: Dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(obj, path, indent=1, default=str)


def read_json(path: Path) -> Dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


class Record:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.data: Dict[str, Any] = {}

    def put(self, key: str, value: Any) -> Any:
        self.data[key] = value
        write_json(self.data, self.path)
        return value

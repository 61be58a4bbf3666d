"""Run logging: TensorBoard scalars/images/text and a JSON-lines file with the same scalars (rank 0 only),
and the device-hours clock (wall time of the training loop, summed over ranks)."""

import json
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Dict, Optional, Tuple

import torch

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.writer: Optional['SummaryWriter'] = None
        self.jsonl: Optional[IO[str]] = None
        self._unregister: Optional[Callable[[], None]] = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            from ..failure import active_watch

            self.writer = SummaryWriter(log_dir=str(run_dir / 'tb'))
            self.jsonl = open(run_dir / 'log.jsonl', 'a', buffering=1)
            watch = active_watch()
            if watch is not None:  # a rank that another's failure ends leaves by os._exit: no close() then
                self._unregister = watch.flush_at_exit(self.flush)

    def _open(self) -> Tuple['SummaryWriter', IO[str]]:
        """The writer and the JSON-lines file, which ``enabled`` promises are open."""
        assert self.writer is not None and self.jsonl is not None, 'RunLogger is enabled but not open'
        return self.writer, self.jsonl

    def scalars(self, step: int, values: Dict[str, float], **fields) -> None:
        if not self.enabled:
            return
        writer, jsonl = self._open()
        for k, v in values.items():
            writer.add_scalar(k, v, step)
        jsonl.write(json.dumps({'iteration': step, **fields, **values}) + '\n')

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self._open()[0].add_text(tag, text, step)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """(N, C, H, W) in [0, 1]."""
        if self.enabled:
            self._open()[0].add_images(tag, images.clamp(0, 1), step)

    def flush(self) -> None:
        if self.enabled:
            writer, jsonl = self._open()
            writer.flush()
            jsonl.flush()

    def close(self) -> None:
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        if self.enabled:
            writer, jsonl = self._open()
            writer.close()
            jsonl.close()
            self.enabled = False


class DeviceClock:
    """Seconds this rank has spent in the training loop (across resumes). Device-hours = the sum over ranks
    x devices per rank (1 GPU) or x CPU threads per rank on CPU, labelled core-hours there."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self._start: Optional[float] = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def lap(self) -> float:
        """Add the time since start()/the last lap and restart; returns the total."""
        now = time.perf_counter()
        if self._start is not None:
            self.seconds += now - self._start
        self._start = now
        return self.seconds

    def stop(self) -> float:
        total = self.lap()
        self._start = None
        return total


def device_unit(device_kind: str) -> str:
    return 'GPU-hours' if device_kind == 'cuda' else 'core-hours'


def devices_per_rank(device_kind: str) -> int:
    return 1 if device_kind == 'cuda' else torch.get_num_threads()

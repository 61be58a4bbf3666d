"""Small file helpers every stage uses: atomic writes, file digests, nested-dict merge.

An atomic write goes to a hidden temporary next to the target (``.{name}.tmp{pid}``), is flushed to disk and
renamed over the target with the mode a plainly written file would have: a reader sees the old file or the
new one, never a torn one, even when the writer is killed or the machine loses power.
"""

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Collection, Dict, Iterator, Optional, Tuple, Union

PathLike = Union[str, os.PathLike]


def sha256(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: PathLike) -> None:
    """Make a folder's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (0o644 under umask 022)."""
    try:  # Linux >= 4.7 reports it; os.umask() can only be read by setting it, which races other threads
        with open('/proc/self/status') as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith('Umask:'))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def replace_into_place(tmp: PathLike, path: PathLike) -> None:
    """Rename a finished temporary file over ``path`` with the mode a plainly written file would have:
    writers that go through mkstemp (safetensors among them) create 0600 files, unreadable to collaborators."""
    os.chmod(tmp, new_file_mode())
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` for a writer that takes a file name (safetensors, matplotlib); when the
    block ends, the file written there is fsynced and renamed over ``path``. If the block raises, the temporary is
    removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        replace_into_place(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: PathLike, mode: str = 'wb', encoding: Optional[str] = None) -> Iterator[Any]:
    """``open(path, mode)`` for writing, made atomic (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding) as f:
            yield f


def atomic_write_text(text: str, path: PathLike) -> None:
    with atomic_open(path, 'w', encoding='utf-8') as f:
        f.write(text)


def atomic_write_json(obj: Any, path: PathLike, **dumps_kwargs: Any) -> None:
    """``obj`` as JSON (``json.dumps`` keyword arguments, e.g. indent) with a final newline, written atomically."""
    atomic_write_text(json.dumps(obj, **dumps_kwargs) + '\n', path)


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` made atomic (torch imported here: this module stays light for launch)."""
    import torch

    with atomic_open(path, 'wb') as f:
        try:
            torch.save(obj, f)
        except RuntimeError as exn:  # torch reports a failed write (disk full) as 'unexpected pos ...'
            if isinstance(exn.__context__, OSError):
                raise exn.__context__ from None
            raise


def deep_merge(base: Dict, over: Dict, whole: Collection[Tuple[str, ...]] = (), _path: Tuple[str, ...] = ()) -> Dict:
    """``base`` updated by ``over`` key by key, recursing into mappings both sides hold; a mapping at a key path in
    ``whole`` (e.g. ``('model', 'kwargs')``) replaces the base's instead. Neither input is changed."""
    out = dict(base)
    for k, v in over.items():
        sub = _path + (k,)
        if isinstance(v, dict) and isinstance(out.get(k), dict) and sub not in whole:
            out[k] = deep_merge(out[k], v, whole, sub)
        else:
            out[k] = v
    return out

"""Shards checked against the index that lists them, and their content identity.

A shard index (``{prefix}-index.json``, written by ``make_shards``) records per shard its file size, sample
count and SHA-256. Two levels of checking use it:

- ``check_against_index`` (every reader, at start-up; one ``stat`` per shard): each local shard that an
  index in its folder lists has the recorded size, and the recorded counts are consistent and could fit in
  that size. A shard truncated on a member boundary is a valid tar, so only its size gives it away.
  Pretraining stops there: hashing ImageNet's 140 GB at every start and requeue, on every node, would cost
  minutes of I/O for nothing the run-time count (below) does not also catch.
- ``scan_shards`` (evaluation): SHA-256 and sample count of every shard in one read, memoised in a JSON
  file by (path, size, mtime, ctime, inode), so the evaluators key their caches and results by content and
  a re-run, or another checkpoint on the same data, reads nothing again. ``verify_content`` refuses a
  shard whose bytes, sample count or tar structure disagree with its index.

At run time the readers compare what each shard yielded with its index count (``index_counts``) and count
the missing samples as skipped.
"""

import hashlib
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from webdataset import tariterators

from skipssl_common.io import atomic_write_json

from .shards import find_indices, is_remote, read_index

# Every sample has at least one member: a 512-byte header and one 512-byte data block.
MIN_SAMPLE_BYTES = 2 * tarfile.BLOCKSIZE
_END_BYTES = 2 * tarfile.BLOCKSIZE
_READ_BLOCK = 1 << 20
MEMO_FORMAT = 'skipssl-shard-scans/1'


class ShardIntegrityError(ValueError):
    """A shard that does not match its index (or is not a complete tar)."""


@dataclass(frozen=True)
class IndexedShard:
    """A shard's entry in the index that lists it."""

    index: str
    num_samples: Optional[int]
    num_bytes: Optional[int]
    sha256: Optional[str]
    index_problem: Optional[str] = None  # the index contradicts itself (refused where its shards are used)


def _folder_entries(folder: Path) -> Dict[str, IndexedShard]:
    """real path -> entry, for every shard that an index in ``folder`` lists."""
    entries: Dict[str, IndexedShard] = {}
    for path in find_indices(folder):
        try:
            index = read_index(path)
        except (OSError, ValueError) as exn:
            raise ShardIntegrityError(f'shard index {path} is unreadable: {exn}') from exn
        problem = _totals_problem(path, index)
        for s in index['shards']:
            entries.setdefault(
                os.path.realpath(folder / s['name']),
                IndexedShard(str(path), s.get('num_samples'), s.get('num_bytes'), s.get('sha256'), problem),
            )
    return entries


def _totals_problem(path: Path, index: dict) -> Optional[str]:
    counts = [s.get('num_samples') for s in index['shards']]
    if 'num_samples' in index and None not in counts and sum(counts) != index['num_samples']:
        return (
            f"shard index {path} says num_samples {index['num_samples']} but its shards' counts add up to "
            f'{sum(counts)}: rebuild it with make_shards'
        )
    return None


def indexed_shards(urls: Iterable[str]) -> Dict[str, IndexedShard]:
    """url -> index entry, for every local shard of ``urls`` that an index in the shard's folder lists."""
    folders: Dict[Path, Dict[str, IndexedShard]] = {}
    found = {}
    for url in urls:
        if is_remote(url):
            continue
        folder = Path(url).parent
        if folder not in folders:
            folders[folder] = _folder_entries(folder)
        entry = folders[folder].get(os.path.realpath(url))
        if entry is not None:
            found[url] = entry
    return found


def index_counts(urls: Sequence[str]) -> Dict[str, int]:
    """url -> sample count its index records (shards without one are left out)."""
    return {u: e.num_samples for u, e in indexed_shards(urls).items() if e.num_samples is not None}


def check_against_index(urls: Sequence[str]) -> None:
    """Refuse, naming the shard, a local shard whose size differs from its index's record, or whose index
    count cannot fit in its bytes (an overstated index). One stat per shard."""
    for url, entry in indexed_shards(urls).items():
        if entry.index_problem:
            raise ShardIntegrityError(entry.index_problem)
        size = os.path.getsize(url)
        if entry.num_bytes is not None and size != entry.num_bytes:
            raise ShardIntegrityError(
                f'shard {url} is {size} bytes but its index {entry.index} records {entry.num_bytes} '
                f'({"truncated" if size < entry.num_bytes else "replaced or appended to"}): rebuild the shards '
                'with make_shards, or restore the file'
            )
        if entry.num_samples is not None and entry.num_samples * MIN_SAMPLE_BYTES + _END_BYTES > size:
            raise ShardIntegrityError(
                f'shard {url}: its index {entry.index} records {entry.num_samples} samples, more than its '
                f'{size} bytes can hold (at least {MIN_SAMPLE_BYTES} bytes each): the index overstates its counts'
            )


# -- content scans -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardScan:
    sha256: str
    num_bytes: int
    num_samples: int  # as the readers group members into samples
    error: Optional[str] = None  # why the tar could not be read to its end


class _HashingReader:
    """A read-only stream that hashes every byte read through it."""

    def __init__(self, f) -> None:
        self.f, self.digest, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(_READ_BLOCK):
            pass


def scan_shard(path: str) -> ShardScan:
    """SHA-256 of the file and its samples, grouped exactly as the readers group them, in one read."""
    errors: List[Exception] = []

    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return False  # stop at the first error: nothing after it is a reliable count

    with open(path, 'rb') as f:
        reader = _HashingReader(f)
        stream = tariterators.tar_file_expander([{'url': path, 'stream': reader}], handler=handler)
        count = sum(1 for _ in tariterators.group_by_keys(stream, handler=handler))
        reader.drain()
    # webdataset appends ' @ <stream object>' to the message: not worth a line of the error
    error = None
    if errors:
        message = str(errors[0].args[0]) if errors[0].args else ''
        error = f'{type(errors[0]).__name__}: {message.split(" @ ")[0]}'
    return ShardScan(reader.digest.hexdigest(), reader.size, count, error)


def _stat_key(st: os.stat_result) -> List[int]:
    # ctime too: a file rewritten in place keeps its inode and may get its old mtime back (touch -d), never
    # its old ctime
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def scan_shards(
    paths: Sequence[str], memo: Optional[os.PathLike] = None, workers: Optional[int] = None
) -> Dict[str, ShardScan]:
    """path -> ShardScan; scans are reused from, and added to, the JSON file ``memo`` while the file's
    stat is unchanged. Shards not in the memo are read by ``workers`` threads (default: up to 8): SHA-256
    and file reads release the GIL, which is where the time goes for shards of full-size images (only
    the per-member tar parsing holds it)."""
    known = _read_memo(memo)
    out, todo = {}, {}
    for path in paths:
        real = os.path.realpath(path)
        before = _stat_key(os.stat(real))
        hit = known.get(real)
        if hit is not None and hit['stat'] == before:
            out[path] = ShardScan(**hit['scan'])
        else:
            todo[path] = (real, before)
    for path, scan in zip(todo, _map(scan_shard, [real for real, _ in todo.values()], workers)):
        real, before = todo[path]
        if _stat_key(os.stat(real)) != before:
            raise ShardIntegrityError(f'shard {path} changed while it was being read: is it still being written?')
        out[path] = scan
        known[real] = {'stat': before, 'scan': asdict(scan)}
    if memo is not None and todo:
        Path(memo).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json({'format': MEMO_FORMAT, 'shards': known}, memo, indent=0)
    return out


def _map(fn, items: List[str], workers: Optional[int]) -> List:
    workers = min(len(items), workers or min(os.cpu_count() or 1, 8))
    if workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def _read_memo(memo: Optional[os.PathLike]) -> Dict[str, dict]:
    try:
        data = json.loads(Path(memo).read_text()) if memo is not None else {}
    except (OSError, ValueError):
        return {}  # absent or damaged: scan again
    return data.get('shards', {}) if data.get('format') == MEMO_FORMAT else {}


def verify_content(urls: Sequence[str], memo: Optional[os.PathLike] = None) -> Dict[str, ShardScan]:
    """Scans of local ``urls`` after refusing, naming the shard, one that is not a complete tar or whose
    SHA-256, size or sample count differ from its index's record."""
    local = [u for u in urls if not is_remote(u)]
    scans = scan_shards(local, memo)
    entries = indexed_shards(local)
    for url in local:
        scan, entry = scans[url], entries.get(url)
        if scan.error:
            raise ShardIntegrityError(
                f'shard {url} is not a complete tar after {scan.num_samples} samples '
                f'({scan.error}): truncated? rebuild it with make_shards'
            )
        if entry is None:
            continue
        if entry.num_bytes is not None and scan.num_bytes != entry.num_bytes:
            raise ShardIntegrityError(
                f'shard {url} is {scan.num_bytes} bytes but its index {entry.index} records {entry.num_bytes}'
            )
        if entry.sha256 is not None and scan.sha256 != entry.sha256:
            raise ShardIntegrityError(
                f'shard {url}: its bytes differ from the SHA-256 its index {entry.index} '
                'records (replaced after the index was written?)'
            )
        if entry.num_samples is not None and scan.num_samples != entry.num_samples:
            raise ShardIntegrityError(
                f'shard {url} holds {scan.num_samples} samples but its index {entry.index} records '
                f'{entry.num_samples}: the index '
                f'{"overstates" if entry.num_samples > scan.num_samples else "understates"}'
                ' its counts'
            )
    return scans


def content_digest(scans: Dict[str, ShardScan], classes: Optional[List[str]] = None) -> str:
    """One digest of a dataset's content: its shards' SHA-256s, in any order and under any names, and the
    class names its index gives the labels."""
    blob = json.dumps({'shards': sorted(s.sha256 for s in scans.values()), 'classes': classes})
    return hashlib.sha256(blob.encode()).hexdigest()


# -- the identity of a training set ------------------------------------------------------------------------
@dataclass(frozen=True)
class DataIdentity:
    """What a set of shards is, for telling a resumed run's data from the one it started with, at the cost of
    one ``stat`` per shard and one read per index (no shard is read): each shard's name (not its folder: shards
    copied elsewhere are the same data), size, and the sample count and SHA-256 its index records, in stream
    order, and a digest of each index. Shards without an index that are rebuilt to the same names and sizes are
    not told apart."""

    shards: Tuple[Tuple[str, Optional[int], Optional[int], Optional[str]], ...]  # name, bytes, samples, sha256
    indices: Tuple[Tuple[str, str], ...]  # index file name, digest of its content

    @property
    def fingerprint(self) -> str:
        blob = json.dumps({'shards': self.shards, 'indices': self.indices})
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_dict(self) -> Dict:
        shards, indices = [list(s) for s in self.shards], [list(i) for i in self.indices]
        return {'fingerprint': self.fingerprint, 'shards': shards, 'indices': indices}

    @classmethod
    def from_dict(cls, d: Dict) -> 'DataIdentity':
        return cls(tuple(tuple(s) for s in d['shards']), tuple(tuple(i) for i in d['indices']))

    def changes_from(self, old: 'DataIdentity') -> str:
        """What differs from ``old``, in a phrase ('' when nothing does)."""
        if old == self:
            return ''
        before, now = {s[0]: s for s in old.shards}, {s[0]: s for s in self.shards}
        out = []
        for what, names in (
            ('added', [n for n in now if n not in before]),
            ('gone', [n for n in before if n not in now]),
        ):
            if names:
                out.append(f'{len(names)} shard(s) {what} ({_some(names)})')
        for i, field in ((1, 'bytes'), (2, 'samples')):
            diff = [
                f'{n} {before[n][i]} -> {s[i]} {field}' for n, s in now.items() if n in before and before[n][i] != s[i]
            ]
            if diff:
                out.append(_some(diff))
        rehashed = [n for n, s in now.items() if n in before and before[n][1:3] == s[1:3] and before[n][3] != s[3]]
        if rehashed:
            out.append(f'{_some(rehashed)}: other content (SHA-256 in the index)')
        old_idx, new_idx = dict(old.indices), dict(self.indices)
        idx = sorted(n for n in set(old_idx) | set(new_idx) if old_idx.get(n) != new_idx.get(n))
        if idx:
            out.append(f'index {_some(idx)} rewritten')
        if not out:
            out.append('the same shards in another order')
        return '; '.join(out)


def _some(items: List[str], n: int = 3) -> str:
    return ', '.join(items[:n]) + (f' and {len(items) - n} more' if len(items) > n else '')


def data_identity(urls: Sequence[str]) -> DataIdentity:
    """The identity of the shards ``urls`` (``resolve_shards``'s answer), in stream order."""
    entries = indexed_shards(urls)
    shards = []
    for url in urls:
        e = entries.get(url)
        size = None if is_remote(url) else os.path.getsize(url)
        count, digest = (None, None) if e is None else (e.num_samples, e.sha256)
        shards.append((url.rstrip('/').rsplit('/', 1)[-1], size, count, digest))
    indices = []
    for path in sorted({e.index for e in entries.values()}):
        content = json.dumps(read_index(path), sort_keys=True)
        indices.append((Path(path).name, hashlib.sha256(content.encode()).hexdigest()))
    return DataIdentity(tuple(shards), tuple(indices))

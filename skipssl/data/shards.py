"""Where shards are: a folder, an index file, a brace pattern, or a list of URLs (``pipe:``, http(s))."""

import json
import os
from pathlib import Path
from typing import List, Optional, Sequence, Union, cast

from webdataset.shardlists import expand_urls

INDEX_SUFFIX = '-index.json'
_REMOTE = ('pipe:', 'http://', 'https://', 'gs://', 's3://')


def is_remote(url: str) -> bool:
    """Read through a URL scheme or a shell command, not a local path: never stat, hash or resolve it here."""
    return str(url).startswith(_REMOTE)


def find_indices(folder: Union[str, Path], prefix: Optional[str] = None) -> List[Path]:
    """The shard indices in ``folder``, sorted: ``{prefix}-index.json``, or every ``*-index.json`` without one."""
    return sorted(Path(folder).glob(f'{prefix or "*"}{INDEX_SUFFIX}'))


def index_path(spec: Union[str, Sequence[str]], prefix: Optional[str] = None) -> Optional[Path]:
    """The one index file ``spec`` names: an index (``.json``) file, or a folder holding exactly one index (of
    ``prefix`` when given); None for anything else (lists, patterns, remote URLs, folders without one)."""
    if isinstance(spec, (list, tuple)) or is_remote(str(spec)):
        return None
    path = Path(cast(str, spec))  # lists and tuples returned above
    if path.is_dir():
        indices = find_indices(path, prefix)
        return indices[0] if len(indices) == 1 else None
    return path if path.is_file() and path.name.endswith('.json') else None


def read_index(path: Union[str, Path]) -> dict:
    with open(path) as f:
        index = json.load(f)
    if 'shards' not in index:
        raise ValueError(f"{path} is not a shard index (no 'shards' list)")
    return index


def check_pipe(url: str, allow_pipe: bool) -> None:
    """``pipe:`` specs are shell commands (webdataset runs them when it opens the shard): only with an opt-in."""
    if url.startswith('pipe:') and not allow_pipe:
        raise ValueError(
            f'shard spec {url!r} is a shell command (pipe:), refused without an explicit opt-in '
            '(data.allow_pipe_shards=true for pretraining, --allow-pipe-shards for the evaluators)'
        )


def resolve_shards(
    spec: Union[str, Sequence[str]], prefix: Optional[str] = None, allow_pipe: bool = False
) -> List[str]:
    """Shard URLs from ``spec``; fails at once, naming the path, if nothing usable is there.

    - a folder: the shards of its ``*-index.json`` (``prefix`` picks one when there are several, e.g.
      train and test), else every ``*.tar`` in it, sorted;
    - an index file (``*-index.json``): its shards, relative to the file;
    - a ``.txt`` file: one URL or path per line;
    - a brace pattern or URL (``data/train-{000000..000099}.tar``, ``pipe:curl -s ...``), or a list of them.
    Local paths must exist and be non-empty, and have the size their index records (see ``integrity``);
    remote URLs are checked when read. ``pipe:`` specs (also as lines of a list) run a shell command per shard
    and are refused unless ``allow_pipe``.
    """
    from .integrity import check_against_index  # integrity reads indices through this module

    urls = _resolve(spec, prefix, allow_pipe)
    check_against_index(urls)
    return urls


def _resolve(spec: Union[str, Sequence[str]], prefix: Optional[str], allow_pipe: bool) -> List[str]:
    if isinstance(spec, (list, tuple)):
        urls = [u for s in spec for u in _resolve(s, prefix, allow_pipe)]
    else:
        spec = str(spec)
        check_pipe(spec, allow_pipe)
        if is_remote(spec):
            urls = expand_urls(spec)
        elif os.path.isdir(spec):
            urls = _from_folder(Path(spec), prefix)
        elif spec.endswith('.json'):
            urls = _from_index(Path(spec))
        elif spec.endswith('.txt') and os.path.isfile(spec):
            lines = [ln.strip() for ln in Path(spec).read_text().splitlines()]
            urls = _resolve([ln for ln in lines if ln and not ln.startswith('#')], prefix, allow_pipe)
        else:
            urls = expand_urls(spec)
    if not urls:
        raise FileNotFoundError(f'no shards found in {spec!r}')
    for url in urls:
        check_pipe(url, allow_pipe)
        if not is_remote(url):
            if not os.path.isfile(url):
                raise FileNotFoundError(f'shard {url} does not exist')
            if os.path.getsize(url) == 0:
                raise ValueError(f'shard {url} is empty')
    return urls


def _from_folder(folder: Path, prefix: Optional[str]) -> List[str]:
    indices = find_indices(folder, prefix)
    if len(indices) > 1:
        names = ' or '.join(str(p) for p in indices)
        raise ValueError(
            f'{folder} holds several shard indices: name one, {names} (the evaluators also take '
            '--train-prefix / --test-prefix)'
        )
    if indices:
        return _from_index(indices[0])
    pattern = f'{prefix}-*.tar' if prefix else '*.tar'
    tars = sorted(str(p) for p in folder.glob(pattern))
    if not tars:
        raise FileNotFoundError(f'no shards ({pattern}) or shard index in folder {folder}')
    return tars


def _from_index(path: Path) -> List[str]:
    if not path.is_file():
        raise FileNotFoundError(f'shard index {path} does not exist')
    index = read_index(path)
    return [str(path.parent / s['name']) for s in index['shards']]


def count_samples(spec: Union[str, Sequence[str]], prefix: Optional[str] = None) -> Optional[int]:
    """Number of samples recorded in the index of ``spec`` (a folder with one index, or an index file);
    None when there is no index to read it from."""
    path = index_path(spec, prefix)
    if path is None:
        return None
    index = read_index(path)
    counts = [s.get('num_samples') for s in index['shards']]
    return None if None in counts else sum(counts)

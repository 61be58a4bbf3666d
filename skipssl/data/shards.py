"""Where shards are: a folder, an index file, a brace pattern, or a list of URLs (``pipe:``, http(s))."""

import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union, cast

from webdataset.shardlists import expand_urls

INDEX_SUFFIX = '-index.json'
# words that name a dataset split in shard file names: make_shards' 'train-000000.tar', timm's
# 'imagenet1k-validation-0000.tar'
SPLIT_WORDS = ('train', 'validation', 'val', 'test')
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
      train and test), else its ``{prefix}-*.tar``, or without a prefix every ``*.tar`` in it, sorted, unless
      their names belong to several splits (``SPLIT_WORDS``: ``*-train-*.tar`` and ``*-validation-*.tar``),
      which is refused, naming them: a test set read as training data would go unnoticed;
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
    if prefix is None:
        _check_one_split(folder, tars)
    return tars


def split_prefix(name: str) -> Optional[str]:
    """The part of a shard's file name up to the word naming its split ('imagenet1k-validation' of
    'imagenet1k-validation-0003.tar'), or None when no word of it names one."""
    words = re.split(r'([-_.])', name)
    for i in range(0, len(words), 2):
        if words[i].lower() in SPLIT_WORDS:
            return ''.join(words[: i + 1])
    return None


def _check_one_split(folder: Path, tars: List[str]) -> None:
    groups: Dict[str, List[str]] = {}
    for t in tars:
        p = split_prefix(Path(t).name)
        if p is not None:
            groups.setdefault(p, []).append(Path(t).name)
    by_word = {re.split(r'[-_.]', p)[-1].lower(): p for p in groups}
    if len(by_word) < 2:
        return
    found = ', '.join(f'{p}-*.tar ({len(names)})' for p, names in groups.items())
    train = by_word.get('train', next(iter(groups)))
    test = next(p for p in groups if p != train)
    pattern = brace_pattern(groups[train])
    example = f'the pattern {folder / pattern}' if pattern else f'a .txt list of the {train}-* shards'
    raise ValueError(
        f'{folder} holds shards of several splits and no index: {found}; name one, e.g. {example} '
        f'(the evaluators also take --train-prefix {train} --test-prefix {test})'
    )


def brace_pattern(names: Sequence[str]) -> Optional[str]:
    """'x-{0000..0009}.tar' for the names 'x-0000.tar' ... 'x-0009.tar' (one stem, consecutive numbers of
    one width); None for names that no brace pattern gives exactly."""
    parts = [re.fullmatch(r'(.*?)(\d+)\.tar', n) for n in names]
    if not parts or None in parts:
        return None
    heads = {m.group(1) for m in parts if m}
    digits = [m.group(2) for m in parts if m]
    numbers = sorted(int(d) for d in digits)
    if len(heads) != 1 or len({len(d) for d in digits}) != 1 or numbers != list(range(numbers[0], numbers[-1] + 1)):
        return None
    width = len(digits[0])
    return f'{heads.pop()}{{{numbers[0]:0{width}d}..{numbers[-1]:0{width}d}}}.tar'


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

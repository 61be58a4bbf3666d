"""Labelled evaluation shards: found, checked (exist, carry labels, match their index) and identified by
content before any extraction."""

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from skipssl.data import read_index, resolve_shards
from skipssl.data.integrity import content_digest, indexed_shards, verify_content
from skipssl.data.reader import iter_raw_samples, sample_label
from skipssl.data.shards import INDEX_SUFFIX, find_indices, index_path, is_remote

from .errors import EvalError

SCAN_MEMO = 'shard-scans.json'
# Without an index naming the classes, a label must be below the number of training samples (a class no training
# sample can have is never predicted) and below this (ImageNet-21k has 21,841 classes; the k-NN votes and the linear
# heads are sized by the largest label, so a stray 5000000 must not size them).
MAX_UNNAMED_CLASSES = 1 << 16


_ROLE_PREFIXES = {'train': ('train',), 'test': ('test', 'val'), 'val': ('val',)}


@dataclass
class Split:
    role: str  # 'train' / 'test' / 'val'
    spec: str
    urls: List[str]
    num_samples: Optional[int]  # from the shard index, else from the content scan
    classes: Optional[List[str]]
    digest: Optional[str] = None  # content digest (verify_split): feature-cache key, result-file name
    shard_sha256: Dict[str, str] = field(default_factory=dict)  # url -> SHA-256 of local shards (verify_split)
    label_limit: Optional[int] = None  # every label is below it (set_label_limits), checked as samples are read
    label_limit_reason: str = ''

    @property
    def name(self) -> str:
        """Dataset name by default: the folder holding the shards (``data/fmnist/test-*.tar`` -> fmnist)."""
        return 'dataset' if is_remote(self.urls[0]) else Path(self.urls[0]).resolve().parent.name


def first_sample_label(url: str) -> tuple:
    """(key, label or None) of the first sample of a shard."""
    errors = []
    for sample in iter_raw_samples([url], lambda exn: errors.append(exn) or True):
        try:
            return sample['__key__'], sample_label(sample)
        except ValueError as exn:
            raise EvalError(str(exn)) from exn
    raise EvalError(f'shard {url} holds no readable sample ({errors[0] if errors else "empty"})')


def open_split(
    spec: str, role: str, prefix: Optional[str] = None, require_labels: bool = True, allow_pipe: bool = False
) -> Split:
    """Resolve ``spec`` (folder, index, brace pattern, list file) and check that it is usable for evaluation."""
    spec = str(spec)
    local = not is_remote(spec)
    if local and '{' not in spec and not os.path.exists(spec) and not spec.endswith('.tar'):
        raise EvalError(
            f'{role} shards: {spec} does not exist (expected a folder of shards, a '
            f'*{INDEX_SUFFIX} file, a .txt list or a brace pattern)'
        )
    if prefix is None and local and Path(spec).is_dir() and len(find_indices(spec)) > 1:
        # make_shards puts train and test indices in one folder: take the one named like the role
        prefix = next(
            (p for p in _ROLE_PREFIXES.get(role, (role,)) if (Path(spec) / f'{p}{INDEX_SUFFIX}').is_file()), None
        )
    try:
        urls = resolve_shards(spec, prefix, allow_pipe)
    except (FileNotFoundError, ValueError) as exn:
        raise EvalError(f'{role} shards {spec}: {exn}') from exn
    found = index_path(spec, prefix)
    index = read_index(found) if found else None
    classes = index.get('classes') if index else None
    if found is None and local:  # a shard or a pattern: the index that lists all of them names their classes
        entries = indexed_shards(urls)
        listing = {entry.index for entry in entries.values()}
        if len(listing) == 1 and len(entries) == len(urls):
            found = Path(listing.pop())
            classes = read_index(found).get('classes')
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise EvalError(f'{role} shards {spec}: the class list of {found} is not a list of names')
    if require_labels and local:
        key, label = first_sample_label(urls[0])
        if label is None:
            raise EvalError(
                f'{role} shards {spec}: sample {key} of {urls[0]} has no label (.cls or json '
                "'label'); k-NN and linear evaluation need a labelled dataset"
            )
        if label < 0 or (classes and label >= len(classes)):
            raise EvalError(
                f'{role} shards {spec}: sample {key} of {urls[0]} has label {label}, not a class index '
                f'(0..{len(classes) - 1 if classes else "N"}{f", the classes of {found}" if classes else ""})'
            )
    return Split(role, spec, urls, index.get('num_samples') if index else None, classes or None)


def verify_split(split: Split, memo_dir: Path) -> None:
    """Read every local shard once (memoised in ``memo_dir``): refuse one that is not a complete tar or
    disagrees with its index (bytes, SHA-256, sample count); set the split's content digest and, without
    an index, its sample count. Remote shards cannot be hashed without reading them: named, not hashed."""
    if split.digest is not None:
        return
    if any(is_remote(u) for u in split.urls):
        split.digest = hashlib.sha256('\n'.join(split.urls).encode()).hexdigest()
        return
    try:
        scans = verify_content(split.urls, Path(memo_dir) / SCAN_MEMO)
    except (OSError, ValueError) as exn:
        raise EvalError(f'{split.role} shards {split.spec}: {exn}') from exn
    counted = sum(s.num_samples for s in scans.values())
    if split.num_samples is not None and split.num_samples != counted:
        raise EvalError(
            f'{split.role} shards {split.spec}: the index records {split.num_samples} samples, the '
            f'shards hold {counted}'
        )
    split.num_samples = counted
    split.digest = content_digest(scans, split.classes)
    split.shard_sha256 = {url: scan.sha256 for url, scan in scans.items()}


def _identity(url: str) -> str:
    return url if is_remote(url) else os.path.realpath(url)


def check_disjoint(splits: Sequence[Split]) -> None:
    """Refuse two splits sharing a shard file (the same real path) or, once ``verify_split`` has read them, a
    shard's content (the same SHA-256): a test set inside the training data scores near 100% and means nothing."""
    for i, a in enumerate(splits):
        files = {_identity(u) for u in a.urls}
        contents = set(a.shard_sha256.values())
        for b in splits[i + 1 :]:
            shared = [u for u in b.urls if _identity(u) in files]
            what = 'shard file'
            if not shared:
                shared = [u for u, digest in b.shard_sha256.items() if digest in contents]
                what = 'shard with the same content'
            if shared:
                raise EvalError(
                    f'{a.role} shards {a.spec} and {b.role} shards {b.spec} share {len(shared)} {what}(s) '
                    f"({shared[0]}): the {b.role} set must be held out from the {a.role} set; name each set's "
                    'shards alone (an index, a brace pattern, a prefix)'
                )


def set_label_limits(train: Split, splits: Sequence[Split]) -> None:
    """Each split's bound on its labels: the length of its index's class list, else the number of training samples."""
    for split in splits:
        if split.classes:
            split.label_limit = len(split.classes)
            split.label_limit_reason = 'the class list of its shard index'
        else:
            split.label_limit = min(train.num_samples or MAX_UNNAMED_CLASSES, MAX_UNNAMED_CLASSES)
            split.label_limit_reason = (
                'no shard index names the classes, so a label must be below the number of training samples '
                f'and {MAX_UNNAMED_CLASSES}'
            )


@dataclass
class ClassMap:
    """How each split's labels are read against the training set's classes: by name where both shard indices
    list them (a test set of the digits 5-9, which its own index numbers 0-4, is read as 5-9), else by number."""

    by_name: bool
    remap: Dict[str, np.ndarray]  # role -> the training class index of each of its class indices, where they differ

    def labels(self, role: str, labels: np.ndarray) -> np.ndarray:
        table = self.remap.get(role)
        return labels if table is None else table[labels]


def _names(classes: List[str]) -> str:
    return ', '.join(repr(c[:40]) for c in classes[:3]) + (', ...' if len(classes) > 3 else '')


def align_classes(train: Split, others: Sequence[Split], log: Callable[[str], None]) -> ClassMap:
    """The ClassMap of ``others`` against ``train``; EvalError naming both shard sets when names cannot be
    matched: a class that the training set lacks (never predicted: every one of its samples would count as
    wrong), or a name listed twice."""
    remap: Dict[str, np.ndarray] = {}
    for other in others:
        if not (train.classes and other.classes):
            if train.classes or other.classes:
                named, unnamed = (train, other) if train.classes else (other, train)
                log(
                    f'[classes] warning: {named.role} shards {named.spec} name their classes, {unnamed.role} shards '
                    f'{unnamed.spec} do not: labels are compared by number'
                )
            continue
        for split in (train, other):
            seen: set = set()
            twice = [c for c in split.classes or [] if c in seen or seen.add(c)]
            if twice:
                raise EvalError(
                    f'{split.role} shards {split.spec}: class {twice[0][:40]!r} is listed twice in its index, so '
                    f'the labels of {train.spec} and {other.spec} cannot be matched by name'
                )
        if other.classes == train.classes:
            continue
        position = {name: i for i, name in enumerate(train.classes)}
        missing = [name for name in other.classes if name not in position]
        if missing:
            raise EvalError(
                f'{other.role} shards {other.spec} have {len(missing)} classes that the train shards {train.spec} '
                f'lack ({_names(missing)}): a classifier of the training classes never predicts them; '
                'evaluate on shards of training classes'
            )
        remap[other.role] = np.array([position[name] for name in other.classes], dtype=np.int64)
        log(
            f"[classes] {other.role} shards {other.spec}: labels matched by name to the train shards' classes "
            f'({len(other.classes)} of {len(train.classes)})'
        )
    return ClassMap(bool(train.classes) and all(o.classes for o in others), remap)


def check_k(ks, n_train: int, where: str) -> None:
    if max(ks) > n_train:
        raise EvalError(
            f'k={max(ks)} is larger than the training set ({n_train} samples in {where}); '
            'use k <= the number of training samples'
        )

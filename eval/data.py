"""Labelled evaluation shards: found, checked (exist, carry labels, match their index) and identified by
content before any extraction."""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from skipssl.data import read_index, resolve_shards
from skipssl.data.integrity import content_digest, verify_content
from skipssl.data.reader import iter_raw_samples
from skipssl.data.shards import INDEX_SUFFIX, find_indices, index_path, is_remote

from .errors import EvalError

SCAN_MEMO = 'shard-scans.json'


_ROLE_PREFIXES = {'train': ('train',), 'test': ('test', 'val'), 'val': ('val',)}


@dataclass
class Split:
    role: str  # 'train' / 'test' / 'val'
    spec: str
    urls: List[str]
    num_samples: Optional[int]  # from the shard index, else from the content scan
    classes: Optional[List[str]]
    digest: Optional[str] = None  # content digest (verify_split): feature-cache key, result-file name

    @property
    def name(self) -> str:
        """Dataset name by default: the folder holding the shards (``data/fmnist/test-*.tar`` -> fmnist)."""
        return 'dataset' if is_remote(self.urls[0]) else Path(self.urls[0]).resolve().parent.name


def first_sample_label(url: str) -> tuple:
    """(key, label or None) of the first sample of a shard."""
    errors = []
    for sample in iter_raw_samples([url], lambda exn: errors.append(exn) or True):
        if 'cls' in sample:
            return sample['__key__'], int(sample['cls'])
        if 'json' in sample:
            label = json.loads(sample['json']).get('label')
            return sample['__key__'], (int(label) if label is not None else None)
        return sample['__key__'], None
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
    if require_labels and local:
        key, label = first_sample_label(urls[0])
        if label is None or label < 0:
            raise EvalError(
                f'{role} shards {spec}: sample {key} of {urls[0]} has no label (.cls or json '
                "'label'); k-NN and linear evaluation need a labelled dataset"
            )
    return Split(role, spec, urls, index.get('num_samples') if index else None, index.get('classes') if index else None)


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


def check_k(ks, n_train: int, where: str) -> None:
    if max(ks) > n_train:
        raise EvalError(
            f'k={max(ks)} is larger than the training set ({n_train} samples in {where}); '
            'use k <= the number of training samples'
        )

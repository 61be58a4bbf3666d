"""skipssl_common.io: atomic writes land whole or not at all; deep_merge merges key by key except where told."""

import hashlib
import json

import pytest

from skipssl_common import io


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path):
    path = tmp_path / 'a.json'
    io.atomic_write_json({'x': 1}, path, indent=1)
    assert json.loads(path.read_text()) == {'x': 1} and path.read_text().endswith('\n')
    with pytest.raises(RuntimeError, match='killed'):
        with io.atomic_open(path, 'w') as f:
            f.write('{"x": 2, "trunc')
            raise RuntimeError('killed mid-write')
    assert json.loads(path.read_text()) == {'x': 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.json']  # no temporary left behind


def test_atomic_path_for_writers_that_take_a_file_name(tmp_path):
    path = tmp_path / 'b.bin'
    with io.atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith('.b.bin.tmp')
        tmp.write_bytes(b'abc')
        assert not path.exists()
    assert path.read_bytes() == b'abc' and io.sha256(path) == hashlib.sha256(b'abc').hexdigest()


def test_deep_merge():
    base = {'model': {'name': 'a', 'kwargs': {'depth': 2, 'heads': 1}}, 'lr': 1}
    over = {'model': {'kwargs': {'depth': 4}}, 'lr': 2}
    assert io.deep_merge(base, over) == {'model': {'name': 'a', 'kwargs': {'depth': 4, 'heads': 1}}, 'lr': 2}
    assert io.deep_merge(base, over, whole={('model', 'kwargs')}) == {
        'model': {'name': 'a', 'kwargs': {'depth': 4}},
        'lr': 2,
    }
    assert base['model']['kwargs'] == {'depth': 2, 'heads': 1}  # inputs unchanged

"""Shards against their index, on shards the project's writer made: truncation on a member boundary and
mid-member, overstated counts (refused up front, naming the shard; counted at run time when a reader gets
them anyway), content scans and their memo, the writer's own failure modes, and output file modes."""

import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from skipssl.checkpoint import build_backbone, save_backbone
from skipssl.data import EvalShards, ReaderState, SlotShards, TooManyBadSamples, canvas_resize, resolve_shards
from skipssl.data.integrity import scan_shard, scan_shards, verify_content
from skipssl.data.make_shards import main as make_shards_main
from skipssl.data.make_shards import write_shards
from skipssl.data.sources import ImageFolderSource
from skipssl_common.artefacts import ExportMeta
from skipssl_common.io import atomic_torch_save, atomic_write_text
from skipssl_eval.synthetic import class_image

ROOT = Path(__file__).resolve().parents[1]


def image_tree(root: Path, n: int = 20, classes: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / f'c{i % classes}' / f'img{i:03d}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(class_image(rng, i % classes, 16, 1)).save(path)
    return root


@pytest.fixture
def shards(tmp_path):
    """Two shards of 10 samples, written by make_shards, and their index."""
    out = tmp_path / 'shards'
    write_shards(
        ImageFolderSource(image_tree(tmp_path / 'images'), 'train'),
        out,
        'train',
        max_samples=10,
        workers=1,
        progress=False,
    )
    return out


def sample_members(path: Path, sample: int):
    """The tar members of the sample-th sample (in tar order) of a shard."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split('.', 1)[0] for m in members))
    return [m for m in members if m.name.split('.', 1)[0] == keys[sample]]


def truncate(path: Path, size: int) -> None:
    with open(path, 'r+b') as f:
        f.truncate(size)


def edit_index(out: Path, fn) -> None:
    path = out / 'train-index.json'
    index = json.loads(path.read_text())
    fn(index)
    path.write_text(json.dumps(index))


def read_epoch(urls, samples: int, rank: int = 0, world_size: int = 1, **kw) -> ReaderState:
    """The slots' positions after an epoch of ``samples``: one slot per rank, 2 images per slot and iteration."""
    ds = SlotShards(
        urls,
        global_batch=2 * world_size,
        n_slots=world_size,
        iterations_per_epoch=samples // (2 * world_size),
        transform=canvas_resize(8),
        rank=rank,
        world_size=world_size,
        shuffle_buffer=0,
        **kw,
    )
    state = ReaderState()
    for chunk in DataLoader(ds, batch_size=None, num_workers=0):
        state.record(chunk['slot'], chunk)
    return state


def test_truncated_on_a_member_boundary(shards, caplog):
    shard = shards / 'train-000001.tar'
    recorded = shard.stat().st_size
    cut = sample_members(shard, 6)[0].offset
    truncate(shard, cut)
    with tarfile.open(shard) as tar:  # still a valid tar: without the index nothing would notice
        assert len(tar.getmembers()) == 6 * 3
    with pytest.raises(
        ValueError,
        match=f'^shard {shard} is {cut} bytes but its index {shards}/train-index.json '
        f'records {recorded} \\(truncated\\)',
    ):
        resolve_shards(str(shards))
    scan = scan_shard(str(shard))
    assert (scan.num_samples, scan.error) == (6, None)  # the tar itself reads fine: size and count give it away
    with pytest.raises(ValueError, match=f'^shard {shard} is {cut} bytes but its index .* records {recorded}'):
        verify_content([str(shard)])

    # a reader handed the shards anyway counts every sample the index promised and the shard lacks
    urls = [str(shards / 'train-000000.tar'), str(shard)]
    state = read_epoch(urls, 20, max_skip_fraction=0.5)  # one full pass over the 16 samples, and 4 more
    assert state.total_skipped == 4 and state.skipped == [0]
    assert f'shard {shard} ended after 6 of the 10 samples its index records (truncated?): 4 lost' in caplog.text
    assert len(list(EvalShards(urls))) == 16
    # fewer shards than slots (one per rank here): each slot counts the lost samples that were its share
    per_rank = [read_epoch([str(shard)], 8, rank=r, world_size=2, max_skip_fraction=0.9) for r in (0, 1)]
    assert [s.total_skipped for s in per_rank] == [2, 2]


def test_truncated_mid_member(shards, caplog):
    shard = shards / 'train-000000.tar'
    image = sample_members(shard, 6)[-1]
    assert image.name.endswith('.png')
    truncate(shard, image.offset_data + image.size // 2)
    with pytest.raises(ValueError, match=f'^shard {shard} is \\d+ bytes but its index .* \\(truncated\\)'):
        resolve_shards(str(shards))
    # without sizes in the index only reading tells, which the evaluators' content scan does
    edit_index(shards, lambda index: [s.pop('num_bytes') for s in index['shards']])
    with pytest.raises(
        ValueError,
        match=f'^shard {shard} is not a complete tar after 7 samples \\(ReadError: unexpected end of data\\)',
    ):
        verify_content([str(shard)])
    # at run time: sample 6 lost its image (skipped), samples 7-9 are missing (lost), counted once each
    state = read_epoch([str(shard), str(shards / 'train-000001.tar')], 20, max_skip_fraction=0.5)
    assert state.total_skipped == 4 and state.skipped == [1]
    assert f'shard {shard} ended after 7 of the 10 samples' in caplog.text


def test_overstated_index_counts(shards):
    def overstate(factor):
        def fn(index):
            for s in index['shards']:
                s['num_samples'] = 10 * factor
            index['num_samples'] = 20 * factor

        return fn

    edit_index(shards, overstate(3000))  # 60,000 claimed for 20 images
    with pytest.raises(
        ValueError,
        match=f'^shard {shards}/train-000000.tar: its index .* records 30000 samples, '
        'more than its \\d+ bytes can hold .* the index overstates its counts',
    ):
        resolve_shards(str(shards))
    edit_index(shards, lambda index: index.update(num_samples=7))
    with pytest.raises(ValueError, match="says num_samples 7 but its shards' counts add up to 60000"):
        resolve_shards(str(shards))
    # an overstatement the bytes could hold passes the start-up check; reading finds it
    edit_index(shards, overstate(2))
    urls = resolve_shards(str(shards))
    with pytest.raises(
        ValueError,
        match=f'^shard {urls[0]} holds 10 samples but its index .* records 20: the index overstates its counts',
    ):
        verify_content(urls)
    with pytest.raises(TooManyBadSamples, match='were unreadable or missing'):
        read_epoch(urls, 400, min_samples_before_skip_check=20)  # half of every pass is missing


def test_scans_are_memoised_until_the_file_changes(shards, tmp_path):
    urls = resolve_shards(str(shards))
    memo = tmp_path / 'memo.json'
    first = scan_shards(urls, memo)
    index = json.loads((shards / 'train-index.json').read_text())
    assert [first[u].sha256 for u in urls] == [s['sha256'] for s in index['shards']]
    assert [first[u].num_samples for u in urls] == [10, 10]
    # a second scan reads the memo, not the shards (a planted digest comes back)
    saved = json.loads(memo.read_text())
    saved['shards'][os.path.realpath(urls[0])]['scan']['sha256'] = 'planted'
    memo.write_text(json.dumps(saved))
    assert scan_shards(urls, memo)[urls[0]].sha256 == 'planted'
    # a shard rewritten in place, same size: the stat differs, so it is read again
    data = bytearray(Path(urls[0]).read_bytes())
    data[-1] ^= 1
    Path(urls[0]).write_bytes(bytes(data))
    again = scan_shards(urls, memo)[urls[0]]
    assert again.sha256 not in ('planted', first[urls[0]].sha256) and again.num_bytes == first[urls[0]].num_bytes


def test_a_folder_with_two_indices_names_them(shards, tmp_path):
    write_shards(
        ImageFolderSource(tmp_path / 'images', 'test'), shards, 'test', max_samples=10, workers=1, progress=False
    )
    with pytest.raises(
        ValueError,
        match=f'holds several shard indices: name one, {shards}/test-index.json or {shards}/train-index.json',
    ):
        resolve_shards(str(shards))
    assert len(resolve_shards(str(shards / 'train-index.json'))) == 2


def test_make_shards_skips_a_fifo_and_user_errors_are_one_line(tmp_path, capsys):
    images = image_tree(tmp_path / 'images', n=6)
    os.mkfifo(images / 'c0' / 'stuck.jpg')  # opened for reading, it would block the writer forever
    done = subprocess.run(
        [
            sys.executable,
            '-m',
            'skipssl.data.make_shards',
            '--source',
            'imagefolder',
            '--root',
            str(images),
            '--out-dir',
            str(tmp_path / 'out'),
            '--no-progress',
            '--workers',
            '1',
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f'skipping {images}/c0/stuck.jpg: not a regular file' in done.stderr
    assert json.loads((tmp_path / 'out' / 'images-index.json').read_text())['num_samples'] == 6
    (images / 'c0' / 'stuck.jpg').unlink()
    for args, message in [
        (
            ['--root', str(tmp_path / 'nowhere'), '--out-dir', str(tmp_path / 'o2')],
            f'image folder root not found (or not a directory): {tmp_path}/nowhere',
        ),
        (
            ['--root', str(images), '--out-dir', str(tmp_path / 'out' / 'images-index.json' / 'x')],
            f"Not a directory: '{tmp_path}/out/images-index.json/x'",
        ),
    ]:
        assert make_shards_main(['--source', 'imagefolder', '--no-progress', *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith('make_shards: error: ') and err.count('\n') == 1 and message in err, err


@pytest.mark.parametrize('umask', [0o022, 0o002], ids=['umask022', 'umask002'])
def test_outputs_have_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        model = build_backbone(
            'vit_tiny_patch16_224', {'img_size': 16, 'patch_size': 8, 'depth': 1, 'embed_dim': 16, 'num_heads': 1}
        )
        export = save_backbone(
            model, tmp_path / 'export' / 'teacher.safetensors', ExportMeta('vit_tiny_patch16_224', {})
        )
        atomic_write_text('{}', tmp_path / 'a.json')
        atomic_torch_save({'x': torch.zeros(1)}, tmp_path / 'b.pt')
        write_shards(
            ImageFolderSource(image_tree(tmp_path / 'images', n=4)), tmp_path / 'shards', 'x', workers=1, progress=False
        )
    finally:
        os.umask(old)
    outputs = [export, tmp_path / 'a.json', tmp_path / 'b.pt', *sorted((tmp_path / 'shards').iterdir())]
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in outputs} == {
        p.name: oct(0o666 & ~umask) for p in outputs
    }

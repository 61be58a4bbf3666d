"""Inputs that used to hang a tool, eat memory or give the wrong message, on the data and config side: YAML
aliases that expand to billions of values and 5000-deep nesting, values that are not finite, an index-less
folder holding several splits, images whose header declares more pixels than any photograph (decompression
bombs), symbolic link loops in an image tree, an --out-dir inside --root, a 0-byte image."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from skipssl.config import ConfigError, load_config
from skipssl.data import decode_sample, resolve_shards
from skipssl.data import make_shards as M
from skipssl.data.pixels import MAX_IMAGE_PIXELS, image_size
from skipssl.data.reader import iter_raw_samples

from .image_shards import write_pattern_shards
from .test_train import ROOT, TINY, _env

LAUGHS = '\n'.join(
    ['model:', '  kwargs:', '    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f'    {c}: &{c} [{",".join([f"*{p}"] * 9)}]' for p, c in zip('abcdefgh', 'bcdefghi')]
)


# -- config -------------------------------------------------------------------------------------------------
def test_billion_laughs_under_model_kwargs_is_refused_without_expanding_it(tmp_path):
    path = tmp_path / 'laughs.yaml'
    path.write_text(f'base: {TINY}\n{LAUGHS}\n')
    with pytest.raises(
        ConfigError, match=r'laughs.yaml: it holds \d+ values with its aliases expanded, more than 100000'
    ):
        load_config(path)
    with pytest.raises(ConfigError, match='override .*aliases expanded'):
        load_config(TINY, ['model.kwargs={' + LAUGHS.split('kwargs:\n')[1].replace('\n', ', ') + '}'])
    # a few aliases are fine
    path.write_text(f'base: {TINY}\naugment: {{mean: &m [0.5], std: *m}}\n')
    assert load_config(path).augment.std == (0.5,)


def test_a_5000_deep_yaml_is_one_line(tmp_path):
    path = tmp_path / 'deep.yaml'
    path.write_text('model:\n  kwargs:\n    x: ' + '[' * 5000 + ']' * 5000 + '\n')
    with pytest.raises(ConfigError, match='nested more than 64 levels deep'):
        load_config(path)
    proc = subprocess.run(
        [sys.executable, 'pretrain.py', '--config', str(path)], cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith('pretrain.py: config error: '), proc.stderr[-3000:]


def test_messages_quote_values_cut_short():
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ['train.epochs=[' + ','.join(['1'] * 50000) + ']'])
    assert str(info.value).startswith('train.epochs: expected an integer') and len(str(info.value)) < 200


@pytest.mark.parametrize(
    'override, key',
    [
        ('loss.student_temp=0', 'loss.student_temp'),
        ('loss.warmup_teacher_temp=-1', 'loss.warmup_teacher_temp'),
        ('train.epochs=0', 'train.epochs'),
        ('optim.base_lr=.inf', 'optim.base_lr'),
        ('optim.base_lr=inf', 'optim.base_lr'),
        ('optim.base_lr=.nan', 'optim.base_lr'),
        ('optim.base_lr=-1e-3', 'optim.base_lr'),
        ('optim.min_lr=-1', 'optim.min_lr'),
        ('optim.weight_decay=.nan', 'optim.weight_decay'),
        ('data.max_image_pixels=-1', 'data.max_image_pixels'),
    ],
)
def test_each_bad_value_is_named_by_its_own_key(override, key):
    with pytest.raises(ConfigError, match=rf'^{key}: '):
        load_config(TINY, [override])


# -- an index-less folder of several splits ------------------------------------------------------------------
@pytest.mark.parametrize('other', ['validation', 'val', 'test'])
def test_a_folder_of_several_splits_without_an_index_is_refused(tmp_path, other):
    for split, n in (('train', 3), (other, 1)):
        write_pattern_shards(tmp_path, n=30 * n, n_shards=n, prefix=f'imagenet1k-{split}')
    for index in tmp_path.glob('*-index.json'):
        index.unlink()  # timm's imagenet-1k-wds layout: tars only
    with pytest.raises(ValueError) as info:
        resolve_shards(str(tmp_path))
    message = str(info.value)
    assert 'imagenet1k-train-*.tar (3)' in message and f'imagenet1k-{other}-*.tar (1)' in message, message
    pattern = f'{tmp_path}/imagenet1k-train-{{000000..000002}}.tar'
    assert pattern in message and f'--train-prefix imagenet1k-train --test-prefix imagenet1k-{other}' in message
    assert [Path(u).name for u in resolve_shards(pattern)] == [f'imagenet1k-train-00000{i}.tar' for i in range(3)]
    assert len(resolve_shards(str(tmp_path), 'imagenet1k-train')) == 3
    # one split in a folder is taken whole
    for tar in tmp_path.glob(f'imagenet1k-{other}-*'):
        tar.unlink()
    assert len(resolve_shards(str(tmp_path))) == 3


# -- decompression bombs --------------------------------------------------------------------------------------
def _encoded(size, fmt='PNG', mode='L') -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize('fmt', ['PNG', 'JPEG', 'WEBP', 'GIF'])
def test_image_size_is_read_from_the_header(fmt):
    assert image_size(_encoded((123, 45), fmt)) == (123, 45)


def test_decode_sample_refuses_a_bomb_before_decoding_it():
    bomb = _encoded((10_000, 9_000), mode='1')  # 90 megapixels in a few kilobytes
    assert len(bomb) < 100_000 and 10_000 * 9_000 > MAX_IMAGE_PIXELS
    sample = {'__url__': 'x.tar', '__key__': 'k1', 'png': bomb, 'cls': b'1'}
    with pytest.raises(ValueError, match=r'^shard x.tar key k1: 10000 x 9000 pixels, more than the limit'):
        decode_sample(sample, 1)
    small = {'__url__': 'x.tar', '__key__': 'k2', 'jpg': _encoded((100, 60), 'JPEG'), 'cls': b'1'}
    assert decode_sample(small, 1)[0].shape == (1, 60, 100)
    with pytest.raises(ValueError, match='k2: 100 x 60 pixels, more than the limit of 5000'):
        decode_sample(small, 1, max_pixels=5000)
    with pytest.raises(ValueError, match=r'k3: empty image \(0 bytes\)'):
        decode_sample({'__url__': 'x.tar', '__key__': 'k3', 'png': b''}, 1)


# -- make_shards --------------------------------------------------------------------------------------------------
def _tree(root: Path) -> Path:
    for cls in ('a', 'b'):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new('L', (20, 20), 40 * i).save(root / cls / f'{i}.png')
    return root


def _make_shards(capsys, root, out, *extra):
    status = M.main(['--source', 'imagefolder', '--root', str(root), '--out-dir', str(out), '--no-progress', *extra])
    return status, capsys.readouterr().err


def test_symbolic_link_loops_are_skipped_with_a_warning(tmp_path):
    root = _tree(tmp_path / 'root')
    (root / 'a' / 'sub').mkdir()
    (root / 'a' / 'sub' / 'up').symlink_to('..')  # to the class folder
    (root / 'a' / 'sub' / 'top').symlink_to('../..')  # to the root
    (root / 'b' / 'again').symlink_to('.')
    proc = subprocess.run(
        [sys.executable, '-m', 'skipssl.data.make_shards', '--source', 'imagefolder', '--root', str(root)]
        + ['--out-dir', str(tmp_path / 'out'), '--no-progress', '--workers', '1'],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,  # it used to walk every path through the loops: hours, with no output
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for link in ('a/sub/up', 'a/sub/top', 'b/again'):
        assert f'skipping {root / link}: a symbolic link to' in proc.stderr and 'a link loop' in proc.stderr
    assert 'longer than' not in proc.stderr
    index = json.loads((tmp_path / 'out' / 'root-index.json').read_text())
    assert index['num_samples'] == 4


def test_out_dir_inside_root_is_refused_in_one_line(tmp_path, capsys):
    root = _tree(tmp_path / 'root')
    status, err = _make_shards(capsys, root, root / 'shards')
    assert status == 2 and err == f'make_shards: error: --out-dir {root / "shards"} is inside --root {root}: ' + (
        'write the shards outside the image tree\n'
    )
    assert not (root / 'shards').exists()


def test_an_empty_image_is_named_as_empty(tmp_path, capsys):
    root = _tree(tmp_path / 'root')
    (root / 'b' / 'empty.png').write_bytes(b'')
    status, err = _make_shards(capsys, root, tmp_path / 'out', '--workers', '1')
    assert status == 2 and f'cannot store image {root}/b/empty.png: empty image (0 bytes)' in err, err
    assert 'reencode' not in err


@pytest.mark.parametrize('reencode', [[], ['--reencode', 'jpeg']])
def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path, capsys, reencode):
    root = _tree(tmp_path / 'root')
    Image.new('L', (40, 30)).save(root / 'a' / 'big.png')
    status, err = _make_shards(
        capsys, root, tmp_path / 'out', '--workers', '1', '--max-image-pixels', '1000', *reencode
    )
    assert status == 2 and f'{root}/a/big.png: 40 x 30 pixels, more than the limit of 1000' in err, err
    status, err = _make_shards(
        capsys, root, tmp_path / 'out', '--workers', '1', '--max-image-pixels', '1200', *reencode
    )
    assert status == 0, err


def test_shards_with_a_bomb_are_read_past_it(tmp_path):
    """A bomb stored by an older make_shards is skipped by the readers, not decoded."""
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / 'x.tar')) as w:
        w.write({'__key__': 'bomb', 'png': _encoded((10_000, 9_000), mode='1'), 'cls': b'0'})
        w.write({'__key__': 'fine', 'png': _encoded((20, 20)), 'cls': b'1'})
    results = []
    for sample in iter_raw_samples([str(tmp_path / 'x.tar')], handler=lambda exn: True):
        try:
            results.append(decode_sample(sample, 1)[1])
        except ValueError as exn:
            results.append(str(exn).split(': ')[1])
    assert results == ['10000 x 9000 pixels, more than the limit of 89478485 (a decompression bomb?); not decoded', 1]

"""The shard writer: round trips read back with plain tarfile (not the writer's code), determinism, the
byte bound, resuming, refusing a mismatched out_dir, Fashion-MNIST from its IDX files, and bad inputs."""

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skipssl.data import make_shards as M
from skipssl.data.sources import FASHION_MNIST_CLASSES, FashionMNISTSource, ImageFolderSource

FMNIST = Path('/usr/share/datasets/fashion-mnist')
CLASSES = ['cat', 'dog sled', 'zebra.v2']  # sorted; a space and a dot that keys must not keep
QUIET = dict(progress=False)


@pytest.fixture
def tree(tmp_path):
    """25 small noise images in 3 classes: JPEG under .jpg/.jpeg/.JPEG, PNG, and a PNG misnamed .JPEG."""
    root, rng = tmp_path / 'train', np.random.default_rng(0)
    for n in range(25):
        label = n % 3
        pixels = rng.integers(0, 256, (int(rng.integers(8, 48)), int(rng.integers(8, 48)), 3), dtype=np.uint8)
        ext, fmt = [('jpg', 'JPEG'), ('png', 'PNG'), ('JPEG', 'JPEG'), ('jpeg', 'JPEG'), ('JPEG', 'PNG')][n % 5]
        path = root / CLASSES[label] / f'img {n:02d}.{ext}'
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, format=fmt)
    return root


def expected_key(relpath):
    class_dir, name = relpath.split('/')
    return f'{class_dir}__{name.rsplit(".", 1)[0]}'.replace(' ', '_').replace('.', '_')


def image_files(tree):
    """{expected key: path} of the tree's images."""
    return {expected_key(p.relative_to(tree).as_posix()): p for p in tree.rglob('*') if p.is_file()}


def read_samples(out_dir, index):
    """[(shard name, key, {ext: bytes})] in tar order, with nothing but tarfile."""
    samples = []
    for shard in index['shards']:
        with tarfile.open(Path(out_dir) / shard['name']) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split('.', 1)
                if not samples or samples[-1][1] != key:
                    samples.append((shard['name'], key, {}))
                samples[-1][2][ext] = tar.extractfile(member).read()
    return samples


def shard_bytes(out_dir):
    return {p.name: p.read_bytes() for p in sorted(Path(out_dir).glob('*.tar'))}


def write(root, out_dir, **kw):
    return M.write_shards(ImageFolderSource(root), out_dir, 'train', **{'max_samples': 4, 'workers': 2, **QUIET, **kw})


def test_round_trip_as_is(tree, tmp_path):
    out = tmp_path / 'out'
    index = write(tree, out)
    assert {
        k: index[k]
        for k in (
            'format',
            'prefix',
            'split',
            'source',
            'num_samples',
            'num_classes',
            'classes',
            'seed',
            'image_format',
        )
    } == {
        'format': 'skipssl-shards/1',
        'prefix': 'train',
        'split': 'train',
        'source': 'imagefolder',
        'num_samples': 25,
        'num_classes': 3,
        'classes': CLASSES,
        'seed': 0,
        'image_format': 'as-is',
    }
    assert [s['name'] for s in index['shards']] == [f'train-{n:06d}.tar' for n in range(7)]
    assert json.loads((out / 'train-index.json').read_text()) == index

    samples = read_samples(out, index)
    originals = image_files(tree)
    assert sorted(key for _, key, _ in samples) == sorted(originals)  # every key exactly once
    for shard in index['shards']:
        assert sum(name == shard['name'] for name, _, _ in samples) == shard['num_samples']
        assert (out / shard['name']).stat().st_size == shard['num_bytes']
        assert hashlib.sha256((out / shard['name']).read_bytes()).hexdigest() == shard['sha256']
    for _, key, members in samples:
        path = originals[key]
        data = path.read_bytes()
        ext = 'png' if data.startswith(b'\x89PNG') else 'jpg'  # by content: the misnamed PNG is .png
        assert sorted(members) == sorted(['cls', 'json', ext])
        assert members[ext] == data
        Image.open(io.BytesIO(members[ext])).verify()
        label = CLASSES.index(path.parent.name)
        assert members['cls'] == str(label).encode()
        assert json.loads(members['json'].decode('utf-8')) == {
            'label': label,
            'class_name': CLASSES[label],
            'source': path.relative_to(tree).as_posix(),
        }
    listing_order = [expected_key(s.source) for s in ImageFolderSource(tree).samples]
    assert [key for _, key, _ in samples] != listing_order
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [s['name'] for s in index['shards']] + ['train-index.json', 'train-plan.json']
    )


def test_png_reencode_keeps_pixels(tree, tmp_path):
    index = write(tree, tmp_path / 'out', reencode='png')
    assert index['image_format'] == 'png'
    originals = image_files(tree)
    for _, key, members in read_samples(tmp_path / 'out', index):
        assert sorted(members) == ['cls', 'json', 'png']
        decoded = Image.open(io.BytesIO(members['png']))
        assert decoded.mode == 'RGB'
        np.testing.assert_array_equal(np.asarray(decoded), np.asarray(Image.open(originals[key]).convert('RGB')))


def test_jpeg_reencode_resizes_the_shorter_side(tree, tmp_path):
    index = write(tree, tmp_path / 'out', reencode='jpeg', quality=80, resize_shorter=16)
    originals = image_files(tree)
    for _, key, members in read_samples(tmp_path / 'out', index):
        w, h = Image.open(originals[key]).size
        expected = (16, int(16 * h / w)) if w <= h else (int(16 * w / h), 16)
        assert Image.open(io.BytesIO(members['jpg'])).size == expected


def test_same_seed_same_bytes_other_seed_other_order(tree, tmp_path):
    a = write(tree, tmp_path / 'a')
    b = write(tree, tmp_path / 'b', workers=1)
    c = write(tree, tmp_path / 'c', seed=1)
    assert a == b and shard_bytes(tmp_path / 'a') == shard_bytes(tmp_path / 'b')
    with tarfile.open(tmp_path / 'a' / 'train-000000.tar') as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}  # no wall-clock time in the headers
    keys = [[key for _, key, _ in read_samples(tmp_path / d, i)] for d, i in (('a', a), ('c', c))]
    assert sorted(keys[0]) == sorted(keys[1]) and keys[0] != keys[1]


@pytest.mark.parametrize('reencode', [None, 'png'])
def test_max_bytes_is_respected(tree, tmp_path, reencode):
    max_bytes = 24 * 1024
    index = write(tree, tmp_path / 'out', max_samples=100, max_bytes=max_bytes, reencode=reencode)
    sizes = [(tmp_path / 'out' / s['name']).stat().st_size for s in index['shards']]
    assert max(sizes) <= max_bytes and len(sizes) > 2
    assert sum(s['num_samples'] for s in index['shards']) == 25
    assert max(s['num_samples'] for s in index['shards']) > 1


def test_a_sample_larger_than_max_bytes_is_named(tree, tmp_path):
    with pytest.raises(ValueError, match=rf'{tree}/.*needs a 10240-byte shard.*--max-bytes 5000'):
        write(tree, tmp_path / 'out', max_bytes=5000)
    assert not list((tmp_path / 'out').glob('*.tar'))


@pytest.mark.parametrize('reencode', [None, 'png'])
def test_resume_after_an_interruption_keeps_finished_shards(tree, tmp_path, monkeypatch, reencode):
    reference = write(tree, tmp_path / 'ref', reencode=reencode)
    out = tmp_path / 'out'
    real_write_shard, calls = M._write_shard, []

    def write_two_then_fail(source, task):
        calls.append(task)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_write_shard(source, task)

    monkeypatch.setattr(M, '_write_shard', write_two_then_fail)
    with pytest.raises(KeyboardInterrupt):
        write(tree, out, workers=1, reencode=reencode)
    finished = json.loads((out / 'train-plan.json').read_text())['finished']
    assert sorted(finished) == ['train-000000.tar', 'train-000001.tar']
    assert not (out / 'train-index.json').exists() and not list(out.glob('.*'))
    stats = {n: ((out / n).stat().st_ino, (out / n).stat().st_mtime_ns) for n in finished}

    monkeypatch.setattr(M, '_write_shard', real_write_shard)
    monkeypatch.setattr(M, '_measure_image', None)  # the recorded cut is reused: nothing is measured again
    assert write(tree, out, reencode=reencode) == reference
    assert {n: ((out / n).stat().st_ino, (out / n).stat().st_mtime_ns) for n in finished} == stats
    assert shard_bytes(out) == shard_bytes(tmp_path / 'ref')


def test_resume_rewrites_only_a_missing_shard(tree, tmp_path):
    out = tmp_path / 'out'
    index = write(tree, out)
    lost = out / 'train-000003.tar'
    lost_bytes = lost.read_bytes()
    lost.unlink()
    (out / 'train-index.json').unlink()
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob('*.tar')}
    assert write(tree, out) == index
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob('*.tar') if p != lost} == kept
    assert lost.read_bytes() == lost_bytes


def test_other_parameters_need_overwrite(tree, tmp_path):
    out = tmp_path / 'out'
    write(tree, out)
    before = shard_bytes(out)
    with pytest.raises(ValueError, match=r'already holds .*max_samples: 4 -> 10.*--overwrite'):
        write(tree, out, max_samples=10)
    assert shard_bytes(out) == before
    index = write(tree, out, max_samples=10, overwrite=True)
    assert index == write(tree, tmp_path / 'fresh', max_samples=10)
    assert shard_bytes(out) == shard_bytes(tmp_path / 'fresh')  # no stale train-000003..6.tar left

    (out / 'train-plan.json').unlink()
    with pytest.raises(ValueError, match='without a readable plan file'):
        write(tree, out, max_samples=10)


def read_idx_gz(path):
    data = gzip.decompress(Path(path).read_bytes())
    ndim = data[3]
    dims = np.frombuffer(data, '>u4', ndim, 4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.mark.skipif(
    not (FMNIST / 't10k-images-idx3-ubyte.gz').exists(),
    reason=f'Fashion-MNIST IDX files not installed in {FMNIST} (Debian package dataset-fashion-mnist)',
)
def test_fashion_mnist_test_split(tmp_path):
    index = M.write_shards(FashionMNISTSource(FMNIST, 'test'), tmp_path, max_samples=3000, workers=2, **QUIET)
    assert (index['split'], index['prefix'], index['source'], index['image_format']) == (
        'test',
        'test',
        'fashion-mnist',
        'png',
    )
    assert index['num_samples'] == 10000 and index['num_classes'] == 10
    assert (
        index['classes']
        == list(FASHION_MNIST_CLASSES)
        == ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
    )
    assert [s['num_samples'] for s in index['shards']] == [3000, 3000, 3000, 1000]

    samples = {key: members for _, key, members in read_samples(tmp_path, index)}
    assert len(samples) == 10000 and set(samples) == {f'fmnist_test_{i:05d}' for i in range(10000)}
    labels = [int(m['cls']) for m in samples.values()]
    assert np.bincount(labels, minlength=10).tolist() == [1000] * 10

    images = read_idx_gz(FMNIST / 't10k-images-idx3-ubyte.gz')
    idx_labels = read_idx_gz(FMNIST / 't10k-labels-idx1-ubyte.gz')
    assert [int(samples[f'fmnist_test_{i:05d}']['cls']) for i in range(10000)] == idx_labels.tolist()
    for i in (0, 1, 4321, 9999):
        members = samples[f'fmnist_test_{i:05d}']
        decoded = Image.open(io.BytesIO(members['png']))
        assert decoded.mode == 'L'
        np.testing.assert_array_equal(np.asarray(decoded), images[i])
        assert json.loads(members['json']) == {
            'label': int(idx_labels[i]),
            'class_name': FASHION_MNIST_CLASSES[idx_labels[i]],
            'source': f'fashion-mnist/test/{i}',
        }

    # the project's reader gets the same pixels and labels back from the folder
    from skipssl.data import EvalShards, resolve_shards

    read = {key: (image, label) for image, label, key in EvalShards(resolve_shards(str(tmp_path)), channels=1)}
    assert len(read) == 10000
    for i in (0, 4321, 9999):
        image, label = read[f'fmnist_test_{i:05d}']
        np.testing.assert_array_equal(image[0].numpy(), images[i])
        assert label == idx_labels[i]


def write_idx_gz(path, magic, payload):
    path.write_bytes(gzip.compress(magic + payload))


def test_fashion_mnist_missing_or_malformed_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f'{tmp_path}/t10k-images-idx3-ubyte.gz'):
        FashionMNISTSource(tmp_path, 'test')
    images, labels = tmp_path / 't10k-images-idx3-ubyte.gz', tmp_path / 't10k-labels-idx1-ubyte.gz'
    write_idx_gz(labels, bytes([0, 0, 8, 1]), np.array([2], '>u4').tobytes() + bytes([3, 4]))
    write_idx_gz(images, bytes([0, 0, 8, 1]), np.array([2], '>u4').tobytes() + bytes(2))  # wrong ndim
    with pytest.raises(ValueError, match=f'{images}: not an IDX file'):
        FashionMNISTSource(tmp_path, 'test')
    write_idx_gz(images, bytes([0, 0, 8, 3]), np.array([2, 28, 28], '>u4').tobytes() + bytes(100))  # truncated
    with pytest.raises(ValueError, match=f'{images}: header says'):
        FashionMNISTSource(tmp_path, 'test')
    images.write_bytes(b'not gzip')
    with pytest.raises(ValueError, match=f'{images}: not a readable gzip'):
        FashionMNISTSource(tmp_path, 'test')
    with pytest.raises(ValueError, match='split'):
        FashionMNISTSource(tmp_path, 'val')


def test_bad_image_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f'{tmp_path}/nowhere'):
        ImageFolderSource(tmp_path / 'nowhere')
    (tmp_path / 'README.txt').write_text('no class folders here')
    with pytest.raises(ValueError, match=f'no class folders in {tmp_path}'):
        ImageFolderSource(tmp_path)
    (tmp_path / 'a').mkdir()
    (tmp_path / 'a' / 'notes.txt').write_text('not an image')
    with pytest.raises(ValueError, match=f'class folder {tmp_path}/a holds no images'):
        ImageFolderSource(tmp_path)
    Image.new('RGB', (4, 4)).save(tmp_path / 'a' / 'x y.jpg')
    Image.new('RGB', (4, 4)).save(tmp_path / 'a' / 'x_y.png')
    with pytest.raises(ValueError, match=f"{tmp_path}/a/x y.jpg and {tmp_path}/a/x_y.png map to the same key 'a__x_y'"):
        ImageFolderSource(tmp_path)


def test_unreadable_images_are_named(tree, tmp_path):
    broken = tree / 'cat' / 'broken.jpg'
    broken.write_bytes(b'\xff\xd8\xff truncated')
    with pytest.raises(ValueError, match=f'cannot store image {broken}'):
        write(tree, tmp_path / 'out', reencode='jpeg')
    assert not list((tmp_path / 'out').glob('*.tar'))  # found while planning, before any shard

    broken.unlink()
    bitmap = tree / 'cat' / 'bitmap.bmp'
    Image.new('RGB', (4, 4)).save(bitmap)
    with pytest.raises(ValueError, match=f'cannot store image {bitmap} as-is.*--reencode'):
        write(tree, tmp_path / 'out')
    assert not list((tmp_path / 'out').glob('*.tar'))

    bitmap.unlink()
    gif = tree / 'cat' / 'really a gif.jpg'
    Image.new('RGB', (4, 4)).save(gif, format='GIF')
    with pytest.raises(ValueError, match=f'cannot store image {gif}: neither JPEG nor PNG.*--reencode'):
        write(tree, tmp_path / 'out')
    assert not list((tmp_path / 'out').glob('.*'))  # no temporary left behind


def test_options_that_do_not_fit_the_source(tree, tmp_path):
    with pytest.raises(ValueError, match='--resize-shorter needs --reencode'):
        write(tree, tmp_path / 'out', resize_shorter=64)
    if (FMNIST / 't10k-images-idx3-ubyte.gz').exists():
        with pytest.raises(ValueError, match='fashion-mnist images can be stored as png, not jpeg'):
            M.write_shards(FashionMNISTSource(FMNIST, 'test'), tmp_path / 'fm', reencode='jpeg', **QUIET)


def test_cli(tree, tmp_path, capsys):
    out = tmp_path / 'out'
    assert (
        M.main(
            [
                '--source',
                'imagefolder',
                '--root',
                str(tree),
                '--out-dir',
                str(out),
                '--max-samples',
                '10',
                '--workers',
                '2',
                '--seed',
                '3',
                '--no-progress',
            ]
        )
        == 0
    )
    index = json.loads((out / 'train-index.json').read_text())
    assert index['seed'] == 3 and [s['num_samples'] for s in index['shards']] == [10, 10, 5]
    assert f'25 samples in 3 shards: {out}/train-index.json' in capsys.readouterr().err
    assert M.main(['--source', 'imagefolder', '--root', str(tmp_path / 'nowhere'), '--out-dir', str(out)]) == 2
    assert (
        f'make_shards: error: image folder root not found (or not a directory): {tmp_path}/nowhere'
        in capsys.readouterr().err
    )

"""What the evaluators must never do with inputs from elsewhere: compare class numbers of differently numbered
shard sets, score a test set that is part of the training data, report an accuracy from NaN weights, features or
losses, write into a run folder an export's metadata names, pass a file's model kwargs to timm unchecked, or size
memory by a label. Each case is refused (or handled) in one line, before any feature is extracted."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import knn_eval
from skipssl.checkpoint import CheckpointError, build_backbone, save_backbone
from skipssl.data.make_shards import write_shards as make_shards
from skipssl.data.sources import ImageFolderSource
from skipssl_common.artefacts import ExportMeta
from skipssl_eval import attention, cka
from skipssl_eval.errors import EvalError
from skipssl_eval.linear import probe_cached
from skipssl_eval.pipeline import run_knn, run_linear
from skipssl_eval.synthetic import class_image, write_shards

MODEL = 'vit_tiny_patch16_224'
KWARGS = {'img_size': 16, 'patch_size': 4, 'depth': 4, 'embed_dim': 16, 'num_heads': 2, 'in_chans': 1}
DATA = {'channels': 1, 'mean': [0.5], 'std': [0.25], 'eval_resize': 16, 'eval_crop': 16}
PIXELS = dict(channels=1, resize=16, crop=16, ks=[5], num_workers=0, batch_size=64, dataset='toy')


def image_tree(root: Path, classes: dict, per_class: int, seed: int) -> Path:
    """Folders named by ``classes`` (name -> the learnable pattern drawn), ``per_class`` images each."""
    rng = np.random.default_rng(seed)
    for name, pattern in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(class_image(rng, pattern, 16, 1)).save(root / name / f'{name}{seed}{i:03d}.png')
    return root


def shards_of(tree: Path, out: Path, prefix: str) -> dict:
    return make_shards(ImageFolderSource(tree), out, prefix, progress=False, workers=1)


def no_features(root: Path) -> bool:
    return not list(root.rglob('features/*.safetensors'))


def export(path: Path, kwargs=KWARGS, fill=None, **meta) -> Path:
    torch.manual_seed(0)
    backbone = build_backbone(MODEL, KWARGS)
    if fill is not None:
        fill(backbone)
    return save_backbone(backbone, path, ExportMeta(MODEL, kwargs, **{'iteration': 5, 'data': DATA, **meta}))


def rewrite_labels(shard: Path, labels: dict) -> None:
    """Rewrite ``.cls`` members of a shard in place (key -> bytes); the file keeps its size (tar pads members to
    512 bytes), so the index's byte count still fits: only reading the samples tells."""
    members = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            key, ext = m.name.rsplit('.', 1)
            members.append((m.name, labels[key] if ext == 'cls' and key in labels else data))
    size = shard.stat().st_size
    with tarfile.open(shard, 'w', format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    assert shard.stat().st_size == size


def one_line(err: str, prog: str) -> str:
    assert 'Traceback' not in err and err.count('\n') == 1 and err.startswith(f'{prog}: error: '), err
    return err


# -- class numbers and class names --------------------------------------------------------------------------------
def test_test_labels_are_matched_to_the_training_classes_by_name(tmp_path):
    """Train on four classes, test on two of them: the test index numbers its classes 0-1, the training index
    2-3. Compared by number, every prediction was wrong (0%); by name, the same images score 100%."""
    data = tmp_path / 'data'
    shards_of(image_tree(tmp_path / 'train', {f'c{i}': i for i in range(4)}, 12, 1), data, 'train')
    index = shards_of(image_tree(tmp_path / 'test', {'c2': 2, 'c3': 3}, 8, 2), data, 'test')
    assert index['classes'] == ['c2', 'c3']
    [res] = run_knn('pixels', str(data), str(data), out_dir=str(tmp_path / 'out'), **PIXELS)
    assert res['top1']['5'] == 100.0 and res['classes_matched_by'] == 'name' and res['num_classes'] == 4
    [lin] = run_linear(
        'pixels',
        str(data),
        str(data),
        out_dir=str(tmp_path / 'out'),
        epochs=30,
        lrs=[1.0],
        linear_batch_size=16,
        **{k: v for k, v in PIXELS.items() if k != 'ks'},
    )
    assert lin['top1'] > 90.0 and lin['num_classes'] == 4

    # a test class the training set lacks cannot be predicted: refused, naming both shard sets
    other = tmp_path / 'other'
    shards_of(image_tree(tmp_path / 'test9', {'c2': 2, 'c9': 3}, 4, 3), other, 'test')
    with pytest.raises(
        EvalError, match=f"test shards {other} have 1 classes that the train shards {data} lack \\('c9'\\)"
    ):
        run_knn('pixels', str(data), str(other), out_dir=str(tmp_path / 'out9'), **PIXELS)
    assert no_features(tmp_path / 'out9')


# -- train / test overlap -----------------------------------------------------------------------------------------
def test_a_test_set_inside_the_training_data_is_refused(tmp_path):
    # no index and no split names: the folder's every tar is "the training set" (a folder mixing split names
    # is refused by the shard resolver itself)
    mixed = tmp_path / 'mixed'
    write_shards(mixed, 'part', [20], index=False)
    write_shards(mixed, 'held', [10], index=False, key_offset=100)
    with pytest.raises(
        EvalError, match=f'train shards {mixed} and test shards {mixed}/held-000000.tar share 1 shard file'
    ):
        run_knn('pixels', str(mixed), str(mixed / 'held-000000.tar'), out_dir=str(tmp_path / 'a'), **PIXELS)
    # a copy of the test shard among the training shards: caught by content, still before extraction
    train = tmp_path / 'train'
    write_shards(train, 'train', [20], index=False)
    shutil.copy(mixed / 'held-000000.tar', train / 'train-000001.tar')
    with pytest.raises(EvalError, match=r'share 1 shard with the same content\(s\) \(.*held-000000.tar\)'):
        run_knn('pixels', str(train), str(mixed / 'held-000000.tar'), out_dir=str(tmp_path / 'b'), **PIXELS)
    assert no_features(tmp_path)


# -- NaN and Inf ------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp('toy')
    write_shards(root / 'train', 'train', [24])
    write_shards(root / 'test', 'test', [12])
    return root


def test_non_finite_weights_are_refused_by_every_command(toy, tmp_path, capsys):
    nan = export(tmp_path / 'nan.safetensors', fill=lambda m: m.blocks[1].mlp.fc1.weight.data.view(-1)[7].fill_(np.nan))
    common = dict(train_shards=str(toy / 'train'), test_shards=str(toy / 'test'), num_workers=0, out_dir=str(tmp_path))
    with pytest.raises(CheckpointError, match=f'{nan}: weight blocks.1.mlp.fc1.weight holds 1 non-finite values'):
        run_knn(str(nan), ks=[5], **common)
    with pytest.raises(CheckpointError, match='non-finite'):
        run_linear(str(nan), **common)
    assert cka.main(['--checkpoint', str(nan), '--shards', str(toy / 'test'), '--out', str(tmp_path / 'c')]) == 2
    assert 'fc1.weight holds 1 non-finite' in one_line(capsys.readouterr().err, 'skipssl-cka')
    image = tmp_path / 'x.png'
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(image)
    assert attention.main(['--checkpoint', str(nan), '--image', str(image), '--out', str(tmp_path / 'a')]) == 2
    assert 'non-finite' in one_line(capsys.readouterr().err, 'skipssl-attention')
    assert no_features(tmp_path) and not (tmp_path / 'c').exists() and not (tmp_path / 'a').exists()


def test_non_finite_features_of_finite_weights_are_refused(toy, tmp_path, capsys):
    """Finite weights whose sums overflow float32 give NaN features: refused, not scored (10% on ten classes)."""
    big = export(tmp_path / 'big.safetensors', fill=lambda m: m.patch_embed.proj.weight.data.fill_(3e38))
    with pytest.raises(EvalError, match='the model gives non-finite features \\(NaN/Inf\\) for sample train_0000'):
        run_knn(str(big), str(toy / 'train'), str(toy / 'test'), ks=[5], num_workers=0, out_dir=str(tmp_path))
    assert cka.main(['--checkpoint', str(big), '--shards', str(toy / 'test'), '--out', str(tmp_path / 'c')]) == 2
    assert 'non-finite activations' in one_line(capsys.readouterr().err, 'skipssl-cka')
    assert not (tmp_path / 'c' / 'cka.json').exists()


def test_linear_probe_stops_at_a_non_finite_loss():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=gen) * 1e18, torch.randint(0, 3, (64,), generator=gen)
    with pytest.raises(EvalError, match='the training loss is not finite .* at epoch 1 for every learning rate'):
        probe_cached(x, y, x, y, 3, base_lrs=[1e12], epochs=3, batch_size=16)
    # a sweep: the diverged head is left out of the choice and its loss recorded as unknown (strict JSON)
    x = torch.randn(64, 8, generator=gen)
    out = probe_cached(x * 1e18, y, x, y, 3, base_lrs=[1e-30, 1e12], epochs=2, batch_size=16, val_fraction=0.25)
    assert out['best_lr'] == 1e-30 and out['train_loss'][1] is None and out['train_loss'][0] is not None


# -- export metadata --------------------------------------------------------------------------------------------
def test_an_export_carried_out_of_its_run_writes_beside_itself(toy, tmp_path):
    other = tmp_path / 'other_run'  # an existing run the export's metadata names
    (other / 'eval').mkdir(parents=True)
    (other / 'summary.json').write_text('{}')
    carried = export(tmp_path / 'elsewhere' / 'model.safetensors', run_dir=str(other))
    [res] = run_knn(str(carried), str(toy / 'train'), str(toy / 'test'), ks=[5], num_workers=0)
    assert Path(res['_path']).parent == tmp_path / 'elsewhere' / 'eval'
    assert not list((other / 'eval').iterdir()) and not (other / 'tb').exists()
    saved = json.loads(Path(res['_path']).read_text())
    assert saved['checkpoint']['run_dir'] is None and saved['checkpoint']['path'] == str(carried.resolve())


@pytest.mark.parametrize(
    'kwargs, match',
    [
        (dict(KWARGS, checkpoint_path='/etc/passwd'), "model kwarg 'checkpoint_path' is refused \\(only the ViT"),
        (dict(KWARGS, pretrained_cfg={'file': '/x'}), "model kwarg 'pretrained_cfg' is refused"),
        (dict(KWARGS, depth=200000), 'model kwarg depth=200000 is out of range'),
        (dict(KWARGS, depth=True), 'model kwarg depth=True is out of range or of the wrong type'),
        (dict(KWARGS, embed_dim=8192, depth=200), 'model kwargs ask for a ViT of about 1.6e\\+11 parameters'),
    ],
)
def test_model_kwargs_from_a_file_pass_an_allow_list(toy, tmp_path, kwargs, match):
    bad = export(tmp_path / 'bad.safetensors', kwargs=kwargs)
    with pytest.raises(CheckpointError, match=f'{bad}: {match}'):
        run_knn(str(bad), str(toy / 'train'), str(toy / 'test'), ks=[5], num_workers=0)


def test_a_huge_metadata_blob_is_refused(toy, tmp_path, capsys):
    bad = export(tmp_path / 'big-meta.safetensors', device_hours_unit='x' * 100_000)
    argv = ['--checkpoint', str(bad), '--train-shards', str(toy / 'train'), '--test-shards', str(toy / 'test')]
    assert knn_eval.main([*argv, '--k', '5', '--num-workers', '0']) == 2
    err = one_line(capsys.readouterr().err, 'knn_eval.py')
    assert f'{bad}: its metadata is 100' in err and len(err) < 400


def test_an_export_of_another_model_is_one_line(toy, tmp_path, capsys):
    """The weights of a 16-wide model under metadata that says 24 wide: the same keys, other shapes."""
    wrong = export(tmp_path / 'wrong.safetensors', kwargs=dict(KWARGS, embed_dim=24))
    argv = ['--checkpoint', str(wrong), '--train-shards', str(toy / 'train'), '--test-shards', str(toy / 'test')]
    assert knn_eval.main([*argv, '--k', '5', '--num-workers', '0']) == 2
    assert f'{wrong}: weights do not fit {MODEL}' in one_line(capsys.readouterr().err, 'knn_eval.py')


# -- labels against the number of classes -------------------------------------------------------------------------
@pytest.mark.parametrize('label', [b'5000000', b'-1'])
def test_labels_outside_the_classes_are_refused_naming_shard_and_key(tmp_path, label, capsys):
    root = tmp_path / 'data'
    write_shards(root / 'train', 'train', [20])  # an index with 4 classes
    write_shards(root / 'test', 'test', [10])
    rewrite_labels(root / 'train' / 'train-000000.tar', {'train_000013': label})
    argv = ['--checkpoint', 'pixels', '--train-shards', str(root / 'train'), '--test-shards', str(root / 'test')]
    argv += ['--channels', '1', '--resize', '16', '--crop', '16', '--k', '5', '--out-dir', str(tmp_path / 'out')]
    assert knn_eval.main([*argv, '--num-workers', '2']) == 2  # raised in a loader worker: still one line
    err = one_line(capsys.readouterr().err, 'knn_eval.py')
    assert (
        f'train-000000.tar key train_000013: label {label.decode()} is not a class index (0..3: the class list of its '
        'shard index)' in err
    )
    assert 'no label' not in err and no_features(tmp_path)


def test_labels_without_an_index_and_labels_that_are_not_integers(tmp_path):
    root = tmp_path / 'data'
    write_shards(root / 'train', 'train', [20], index=False)
    write_shards(root / 'test', 'test', [10], index=False)
    shard = root / 'train' / 'train-000000.tar'
    rewrite_labels(shard, {'train_000004': b'5000000'})  # no index: the bound is the 20 training samples
    run = dict(out_dir=str(tmp_path / 'out'), **PIXELS)
    with pytest.raises(
        EvalError, match='key train_000004: label 5000000 is not a class index \\(0..19: no shard index'
    ):
        run_knn('pixels', str(root / 'train'), str(root / 'test'), **run)
    rewrite_labels(shard, {'train_000004': b'1e11'})
    with pytest.raises(EvalError, match="key train_000004: label '1e11' is not an integer"):
        run_knn('pixels', str(root / 'train'), str(root / 'test'), **run)
    rewrite_labels(shard, {'train_000000': b'-1', 'train_000004': b'1'})  # the first sample, checked up front
    with pytest.raises(EvalError, match='sample train_000000 of .* has label -1, not a class index'):
        run_knn('pixels', str(root / 'train'), str(root / 'test'), **run)
    assert no_features(tmp_path)


# -- preprocessing ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    'flags, match',
    [
        (dict(std=[0.0]), '--std \\[0.0\\]: must be finite and positive'),
        (dict(mean=[float('nan')]), '--mean \\[nan\\]: must be finite'),
        (dict(resize=0), '--resize 0: an image side in pixels, 1..4096'),
        (dict(crop=100000), '--crop 100000: an image side'),
        (dict(channels=2), '--channels 2: images are read as 1 \\(grey\\) or 3 \\(RGB\\) channels'),
    ],
)
def test_bad_preprocessing_flags_are_refused(toy, tmp_path, flags, match):
    with pytest.raises(EvalError, match=match):
        run_knn('pixels', str(toy / 'train'), str(toy / 'test'), out_dir=str(tmp_path), **{**PIXELS, **flags})
    assert no_features(tmp_path)


def test_bad_preprocessing_in_an_export_names_the_export(toy, tmp_path):
    bad = export(tmp_path / 'bad.safetensors', data=dict(DATA, std=[0.0]))
    with pytest.raises(EvalError, match=f"{bad}: its preprocessing's std \\[0.0\\]: must be finite and positive"):
        run_knn(str(bad), str(toy / 'train'), str(toy / 'test'), ks=[5], num_workers=0)


def test_augmented_probe_checks_the_training_labels_it_reads(toy, tmp_path):
    """--augment reads the training shards itself (no feature extraction to check them): a label beyond the
    classes stops it in one line, not in cross_entropy."""
    train = tmp_path / 'train'
    write_shards(train, 'train', [32])
    rewrite_labels(train / 'train-000000.tar', {f'train_{i:06d}': b'7' for i in range(1, 32)})
    exp = export(tmp_path / 'run' / 'export' / 'teacher-00000005.safetensors')
    with pytest.raises(EvalError, match='augmented linear probe: training sample train_0000.. has label 7, not one of'):
        run_linear(str(exp), str(train), str(toy / 'test'), augment=True, epochs=1, linear_batch_size=16, num_workers=0)


def test_a_shard_named_alone_takes_its_classes_from_the_index_that_lists_it(tmp_path):
    """One training shard named by path (as the demo does): its folder's index still names the classes, so the
    test labels are matched by name, not by number."""
    data = tmp_path / 'data'
    shards_of(image_tree(tmp_path / 'train', {f'c{i}': i for i in range(4)}, 12, 1), data, 'train')
    shards_of(image_tree(tmp_path / 'test', {'c2': 2, 'c3': 3}, 8, 2), data, 'test')
    [res] = run_knn('pixels', str(data / 'train-000000.tar'), str(data), out_dir=str(tmp_path / 'out'), **PIXELS)
    assert res['top1']['5'] == 100.0 and res['classes_matched_by'] == 'name'

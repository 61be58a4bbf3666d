"""Bad input fails at once, before any feature is extracted, with a message saying what is wrong."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from skipssl.checkpoint import CheckpointError, build_backbone, save_backbone
from skipssl_common.artefacts import ExportMeta
from skipssl_eval.errors import EvalError
from skipssl_eval.pipeline import run_knn, run_linear
from skipssl_eval.synthetic import write_shards

ROOT = Path(__file__).resolve().parents[1]
MODEL = 'vit_tiny_patch16_224'
KWARGS = {'img_size': 16, 'patch_size': 4, 'depth': 4, 'embed_dim': 32, 'num_heads': 2, 'in_chans': 1}
DATA = {'channels': 1, 'mean': [0.5], 'std': [0.25], 'eval_resize': 16, 'eval_crop': 16}


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp('bad')
    write_shards(root / 'train', 'train', [30, 20], size=16)
    write_shards(root / 'test', 'test', [25], size=16)
    write_shards(root / 'nolabels', 'test', [10], size=16, labels=False)
    write_shards(root / 'noindex', 'train', [12], size=16, index=False)
    torch.manual_seed(0)
    export = save_backbone(
        build_backbone(MODEL, KWARGS),
        root / 'run' / 'export' / 'teacher-00000005.safetensors',
        ExportMeta(MODEL, KWARGS, iteration=5, data=DATA),
    )
    return root, export


def no_features_extracted(root: Path) -> bool:
    return not list(root.rglob('*.safetensors.tmp*')) and not list(root.rglob('features/*.safetensors'))


def knn(root, export, **kw):
    args = dict(
        checkpoint=str(export),
        train_shards=str(root / 'train'),
        test_shards=str(root / 'test'),
        num_workers=0,
        batch_size=16,
        ks=[5],
    )
    args.update(kw)
    return run_knn(**args)


def test_checkpoint_of_another_architecture(inputs):
    root, export = inputs
    with pytest.raises(EvalError, match=f'holds a {MODEL} backbone, not the vit_tiny_patch16_skipat_224 asked for'):
        knn(root, export, arch='vit_tiny_patch16_skipat_224')
    # weights of a plain ViT labelled as a SkipAt-ViT: the state dict does not fit
    skipat_kwargs = dict(KWARGS, skip_indices=(1, 2))
    wrong = root / 'wrong.safetensors'
    save_backbone(build_backbone(MODEL, KWARGS), wrong, ExportMeta('vit_tiny_patch16_skipat_224', skipat_kwargs))
    with pytest.raises(CheckpointError, match='weights do not fit vit_tiny_patch16_skipat_224'):
        knn(root, wrong)
    # a backbone without a class token cannot give DINO's CLS features
    with pytest.raises(EvalError, match='not a ViT with a class token'):
        knn(root, MODEL, model_kwargs=dict(KWARGS, class_token=False, global_pool='avg'), out_dir=str(root / 'x'))
    with pytest.raises(EvalError, match="unknown model 'no_such_model'"):
        knn(root, 'no_such_model', out_dir=str(root / 'x'))
    assert no_features_extracted(root)


def test_missing_shard_folder(inputs):
    root, export = inputs
    with pytest.raises(EvalError, match=f'train shards: {root}/missing does not exist'):
        knn(root, export, train_shards=str(root / 'missing'))
    (root / 'empty').mkdir(exist_ok=True)
    with pytest.raises(EvalError, match='test shards .*empty: no shards'):
        knn(root, export, test_shards=str(root / 'empty'))
    assert no_features_extracted(root)


def test_dataset_without_labels(inputs):
    root, export = inputs
    with pytest.raises(EvalError, match='test shards .*nolabels: sample test_000000 of .* has no label'):
        knn(root, export, test_shards=str(root / 'nolabels'))
    with pytest.raises(EvalError, match='has no label'):
        run_linear(str(export), str(root / 'nolabels'), str(root / 'test'), num_workers=0)
    assert no_features_extracted(root)


def test_labels_missing_further_into_the_shards(inputs, tmp_path):
    root, export = inputs
    write_shards(tmp_path / 'mixed', 'a', [6], size=16, index=False)  # read first: labelled
    write_shards(tmp_path / 'mixed', 'b', [6], size=16, index=False, labels=False)
    with pytest.raises(EvalError, match='test shards .*mixed: .*b-000000.tar key b_000000 has no label'):
        knn(root, export, test_shards=str(tmp_path / 'mixed'), out_dir=str(tmp_path / 'out'))


def test_k_larger_than_the_training_set(inputs, tmp_path):
    root, export = inputs
    with pytest.raises(EvalError, match=r'k=200 is larger than the training set \(50 samples'):
        knn(root, export, ks=[10, 200])  # the index says 50: refused before extraction
    assert no_features_extracted(root)
    # no index to count from: the content scan counts them, still before extraction
    with pytest.raises(EvalError, match=r'k=100 is larger than the training set \(12 samples'):
        knn(root, export, train_shards=str(root / 'noindex'), ks=[10, 100], out_dir=str(tmp_path))
    assert not list(tmp_path.rglob('features/*.safetensors'))


def test_other_bad_options(inputs):
    root, export = inputs
    with pytest.raises(EvalError, match='model takes 1-channel images but the evaluation reads 3-channel'):
        knn(root, export, ks=[5], channels=3)
    with pytest.raises(EvalError, match='--n-last-blocks 9 but vit_tiny_patch16_224 has 4 blocks'):
        knn(root, export, ks=[5], n_last_blocks=9)
    with pytest.raises(EvalError, match='model name .*--run-dir'):
        knn(root, MODEL, ks=[5])
    with pytest.raises(EvalError, match='--shortlist must be 0 .* got 0.5'):
        knn(root, export, ks=[5], shortlist=0.5)
    with pytest.raises(EvalError, match='sweep with --augment needs --val-shards'):
        run_linear(str(export), str(root / 'train'), str(root / 'test'), sweep=True, augment=True)
    with pytest.raises(EvalError, match='sweep needs --val-fraction > 0'):
        run_linear(str(export), str(root / 'train'), str(root / 'test'), lrs=[0.1, 0.01], val_fraction=0.0)
    with pytest.raises(CheckpointError, match='no complete checkpoint'):
        knn(root, root / 'train', ks=[5])
    assert no_features_extracted(root)


def test_entry_point_prints_one_line_and_exits_2(inputs):
    root, export = inputs
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / 'knn_eval.py'),
            '--checkpoint',
            str(export),
            '--train-shards',
            str(root / 'missing'),
            '--test-shards',
            str(root / 'test'),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 2
    assert (
        out.stderr.strip().splitlines()[-1] == f'knn_eval.py: error: train shards: {root}/missing does not exist '
        '(expected a folder of shards, a *-index.json file, a .txt list or a brace pattern)'
    )
    assert 'Traceback' not in out.stderr

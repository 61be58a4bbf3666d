"""Linear probe: separable features reach 100%; a sweep of heads trained together equals separate runs and
is decided on held-out training data; both modes run end to end and write their results."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from skipssl.checkpoint import build_backbone, save_backbone
from skipssl_common.artefacts import ExportMeta
from skipssl_eval.distributed import Ranks
from skipssl_eval.errors import EvalError
from skipssl_eval.linear import LinearHeads, probe_augmented, probe_cached, scaled_lrs
from skipssl_eval.pipeline import run_linear
from skipssl_eval.synthetic import clustered_features, write_shards


def tensors(n, dim, classes, spread, seed, centers=None):
    x, y, centers = clustered_features(n, dim, classes, spread=spread, seed=seed, centers=centers)
    return torch.from_numpy(x), torch.from_numpy(y), centers


def test_separable_features_reach_100_percent():
    x, y, centers = tensors(2000, 64, 5, 0.3, 0)
    tx, ty, _ = tensors(500, 64, 5, 0.3, 1, centers)
    res = probe_cached(x, y, tx, ty, 5, base_lrs=[1e-3], epochs=20, batch_size=256, progress=lambda m: None)
    assert res['top1'] == 100.0 and res['top5'] == 100.0
    assert res['n_val'] == 0 and res['n_train'] == 2000  # one lr: no held-out part needed
    assert res['lrs_scaled'] == [1e-3]


def test_heads_trained_side_by_side_equal_separate_runs():
    x, y, _ = tensors(300, 16, 4, 1.0, 2)
    lrs = [0.01, 0.3]
    torch.manual_seed(0)
    together = LinearHeads(16, 4, lrs, epochs=3)
    separate = []
    for i, lr in enumerate(lrs):
        head = LinearHeads(16, 4, [lr], epochs=3)
        head.load_state_dict(
            {
                k.replace(f'heads.{i}.', 'heads.0.'): v
                for k, v in together.state_dict().items()
                if k.startswith(f'heads.{i}.')
            }
        )
        separate.append(head)
    for epoch in range(3):
        for model in (together, *separate):
            model.set_epoch(epoch)
        for start in range(0, 300, 64):
            xb, yb = x[start : start + 64], y[start : start + 64]
            together.train_step(xb, yb)
            for head in separate:
                head.train_step(xb, yb)
    for i, head in enumerate(separate):
        torch.testing.assert_close(together.heads[i].weight, head.heads[0].weight, rtol=1e-5, atol=1e-6)


def test_sweep_chooses_on_held_out_training_data_never_on_test():
    x, y, centers = tensors(1500, 32, 6, 2.0, 3)
    tx, ty, _ = tensors(400, 32, 6, 2.0, 4, centers)
    lrs = [1e-5, 1e-3, 1e-1]
    res = probe_cached(x, y, tx, ty, 6, base_lrs=lrs, epochs=5, batch_size=128, progress=lambda m: None)
    assert res['n_val'] == 150 and res['n_train'] == 1350 and len(res['val_top1']) == 3
    assert res['best_lr'] == lrs[int(np.argmax(res['val_top1']))]
    assert res['best_lr_scaled'] == scaled_lrs([res['best_lr']], 128)[0]
    # a test set with scrambled labels changes the test score, not the choice
    scrambled = probe_cached(
        x,
        y,
        tx,
        ty[torch.randperm(400, generator=torch.Generator().manual_seed(0))],
        6,
        base_lrs=lrs,
        epochs=5,
        batch_size=128,
        progress=lambda m: None,
    )
    assert scrambled['best_lr'] == res['best_lr'] and scrambled['val_top1'] == res['val_top1']
    assert scrambled['top1'] < res['top1']
    with pytest.raises(EvalError, match='held-out'):
        probe_cached(x, y, tx, ty, 6, base_lrs=lrs, epochs=1, val_fraction=0.0)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp('linear')
    write_shards(root / 'train', 'train', [48, 40], num_classes=3, size=16)
    write_shards(root / 'test', 'test', [30], num_classes=3, size=16, seed=1)
    kwargs = {'img_size': 16, 'patch_size': 4, 'depth': 4, 'embed_dim': 32, 'num_heads': 2, 'in_chans': 1}
    torch.manual_seed(0)
    save_backbone(
        build_backbone('vit_tiny_patch16_skipat_224', dict(kwargs, skip_indices=(1, 2))),
        root / 'run' / 'export' / 'teacher-00000020.safetensors',
        ExportMeta(
            'vit_tiny_patch16_skipat_224',
            dict(kwargs, skip_indices=[1, 2]),
            iteration=20,
            epoch=2,
            data={'channels': 1, 'mean': [0.5], 'std': [0.25], 'eval_resize': 16, 'eval_crop': 16},
        ),
    )
    return root


def test_cached_sweep_end_to_end(run):
    out = run_linear(
        str(run / 'run' / 'export' / 'teacher-00000020.safetensors'),
        str(run / 'train'),
        str(run / 'test'),
        lrs=[1e-3, 1e-1],
        epochs=3,
        linear_batch_size=32,
        num_workers=0,
    )
    [res] = out
    saved = json.loads(Path(res['_path']).read_text())
    assert Path(res['_path']).name == f'linear-00000020-test-{saved["data_digest"][:8]}.json'
    assert saved['top1'] == res['top1'] and saved['mode'] == 'cached' and saved['epochs'] == 3
    assert saved['checkpoint']['model_name'] == 'vit_tiny_patch16_skipat_224' and saved['iteration'] == 20
    assert saved['feature_dim'] == 4 * 32 and saved['n_val'] == 9 and saved['n_train'] == 79
    assert list((run / 'run' / 'tb').glob('events.out.tfevents.*.linear'))


def test_augmented_mode_end_to_end(run):
    [res] = run_linear(
        str(run / 'run' / 'export' / 'teacher-00000020.safetensors'),
        str(run / 'train'),
        str(run / 'test'),
        augment=True,
        epochs=2,
        lrs=[1.0],
        linear_batch_size=16,
        num_workers=0,
    )
    saved = json.loads(Path(res['_path']).read_text())
    assert Path(res['_path']).parent == run / 'run' / 'eval' and Path(res['_path']).name.startswith(
        'linear_augment-00000020-test-'
    )
    assert saved['mode'] == 'augment' and saved['n_train'] == 80 and saved['n_test'] == 30  # 5 full batches
    assert saved['top1'] == res['top1'] and np.isfinite(saved['train_loss']).all()
    # the accuracy DINO's eval_linear loop predicts on the same augmented batches (the same reader and seed)
    top1, loss = augmented_reference(run, epochs=2, batch=16, base_lr=saved['lrs'][0])
    assert saved['top1'] == pytest.approx(top1, abs=100.0 / 30 + 1e-9)  # at most one near-tied test image apart
    assert saved['train_loss'][0] == pytest.approx(loss, rel=1e-4)
    assert top1 > 50  # learnt: chance is 33% (this lr, 2 epochs: 60% here)


def augmented_reference(run, epochs: int, batch: int, base_lr: float, seed: int = 0):
    """DINO's eval_linear.py written plainly: a frozen backbone, the concatenated CLS tokens of its last 4 blocks,
    nn.Linear (weights N(0, 0.01), zero bias) trained with SGD (momentum 0.9, no weight decay, lr = base lr x
    batch / 256, cosine to 0 stepped per epoch) on augmented crops; top-1 on centre-crop test features.
    Returns (test top-1 in %, the last epoch's mean training loss)."""
    from skipssl.checkpoint import load_backbone
    from skipssl.data import EvalShards, ReaderState, SlotShards, eval_transform, resolve_shards
    from skipssl.data.slots import batches
    from skipssl.models import last_cls_tokens
    from skipssl_eval.linear import augment_transform

    backbone, _ = load_backbone(run / 'run' / 'export' / 'teacher-00000020.safetensors')
    features = lambda x: last_cls_tokens(backbone, x, 4)  # noqa: E731
    train = SlotShards(
        resolve_shards(str(run / 'train')),
        global_batch=batch,
        n_slots=1,
        iterations_per_epoch=88 // batch,
        transform=augment_transform(16, [0.5], [0.25]),
        num_workers=0,
        seed=seed,
        shuffle_buffer=88,
        channels=1,
    )
    torch.manual_seed(seed)
    linear = torch.nn.Linear(4 * 32, 3)
    linear.weight.data.normal_(mean=0.0, std=0.01)
    linear.bias.data.zero_()
    lr = base_lr * batch / 256
    opt = torch.optim.SGD(linear.parameters(), lr, momentum=0.9, weight_decay=0)
    for epoch in range(epochs):
        for group in opt.param_groups:
            group['lr'] = lr * 0.5 * (1 + np.cos(np.pi * epoch / epochs))
        train.set_state(ReaderState(epoch=epoch))
        losses = []
        for b in batches(train, train):
            with torch.no_grad():
                x = features(b['crops'][0])
            loss = torch.nn.functional.cross_entropy(linear(x), b['labels'])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    test = EvalShards(resolve_shards(str(run / 'test')), eval_transform(16, 16, [0.5], [0.25]), channels=1)
    with torch.no_grad():
        hits = [int(linear(features(image[None])).argmax()) == label for image, label, _ in test]
    return 100.0 * sum(hits) / len(hits), float(np.mean(losses))


def test_augmented_probe_refuses_fewer_training_samples_than_one_batch():
    with pytest.raises(EvalError, match='augmented linear probe: 10 training samples are less than one global batch'):
        probe_augmented(None, ['x.tar'], 10, None, None, None, 3, Ranks(), batch_size=16)


def test_all_exports_of_a_run_are_probed_as_the_knn_evaluates_them(run, tmp_path):
    """--all-exports: one linear result per per-epoch export, as knn_eval gives one k-NN result per export."""
    kwargs = {'img_size': 16, 'patch_size': 4, 'depth': 2, 'embed_dim': 16, 'num_heads': 2, 'in_chans': 1}
    data = {'channels': 1, 'mean': [0.5], 'std': [0.25], 'eval_resize': 16, 'eval_crop': 16}
    for it in (10, 20):
        torch.manual_seed(it)
        save_backbone(
            build_backbone('vit_tiny_patch16_224', kwargs),
            tmp_path / 'run' / 'export' / f'teacher-{it:08d}.safetensors',
            ExportMeta('vit_tiny_patch16_224', kwargs, iteration=it, data=data),
        )
    out = run_linear(
        str(tmp_path / 'run'),
        str(run / 'train'),
        str(run / 'test'),
        all_exports=True,
        epochs=1,
        linear_batch_size=32,
        num_workers=0,
        n_last_blocks=2,
    )
    assert [r['iteration'] for r in out] == [10, 20]
    assert sorted(p.name.split('-')[1] for p in (tmp_path / 'run' / 'eval').glob('linear-*.json')) == [
        '00000010',
        '00000020',
    ]
    with pytest.raises(EvalError, match='--all-exports needs a run folder'):
        run_linear(
            str(tmp_path / 'run' / 'export' / 'teacher-00000010.safetensors'),
            str(run / 'train'),
            str(run / 'test'),
            all_exports=True,
        )

"""Feature extraction: 2 gloo ranks give the same cache as 1 rank; cache reuse; the k-NN columns are the
backbone's output; a training checkpoint folder and its export give the same features."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from skipssl.checkpoint import MODEL_FILE, build_backbone, finalize_checkpoint, save_backbone
from skipssl_common.artefacts import ExportMeta
from skipssl_common.distributed import free_port
from skipssl_eval.data import open_split, verify_split
from skipssl_eval.distributed import Ranks, from_env, gather_objects
from skipssl_eval.features import FeatureFile, FeatureSpec, get_features
from skipssl_eval.source import data_settings, load_model
from skipssl_eval.synthetic import write_shards

MODEL = 'vit_tiny_patch16_224'
KWARGS = {'img_size': 16, 'patch_size': 4, 'depth': 4, 'embed_dim': 32, 'num_heads': 2, 'in_chans': 1}
DATA = {'channels': 1, 'mean': [0.5], 'std': [0.25], 'eval_resize': 16, 'eval_crop': 16}
WORLD = 2


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('feats')
    write_shards(root / 'shards', 'test', [37, 20, 23], num_classes=4, size=16)
    torch.manual_seed(0)
    backbone = build_backbone(MODEL, KWARGS)
    export = save_backbone(
        backbone,
        root / 'run' / 'export' / 'teacher-00000010.safetensors',
        ExportMeta(
            MODEL,
            KWARGS,
            iteration=10,
            epoch=1,
            images_seen=640,
            device_hours=0.5,
            device_hours_unit='core-hours',
            data=DATA,
        ),
    )
    return root, export, backbone


def _extract(export, shards, cache, ranks, num_workers):
    module, info = load_model(str(export))
    spec = FeatureSpec.make(4, data_settings(info, {}), 'fp32')
    split = open_split(shards, 'test')
    verify_split(split, cache)
    return get_features(
        module, info, split, spec, cache, ranks, batch_size=8, num_workers=num_workers, log=lambda msg: None
    ), info


def _worker(rank, init_file, export, shards, cache):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    try:
        ranks = from_env('cpu')
        assert (ranks.rank, ranks.world_size) == (rank, WORLD)
        got, _ = _extract(export, shards, cache, ranks, num_workers=0)  # (loader workers would be spawned: slow)
        assert (got is None) == (rank != 0)
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_same_features_as_one(setup, tmp_path):
    root, export, _ = setup
    shards = str(root / 'shards')
    mp.spawn(
        _worker, args=(str(tmp_path / 'init'), str(export), shards, str(tmp_path / 'two')), nprocs=WORLD, join=True
    )
    one, info = _extract(export, shards, tmp_path / 'one', Ranks(), num_workers=0)
    [two_path] = list((tmp_path / 'two').glob('*.safetensors'))
    two = FeatureFile(two_path)
    assert two_path.name == one.path.name and two_path.name.startswith(info.sha256[:16])
    assert one.num == two.num == 80 and one.dim == two.dim == 4 * 32 and one.knn_dim == 32
    assert one.keys() == two.keys() == sorted(f'test_{i:06d}' for i in range(80))
    np.testing.assert_array_equal(one.labels, two.labels)
    np.testing.assert_allclose(one.rows(0, 80), two.rows(0, 80), rtol=0, atol=1e-5)
    assert two.meta['world_size'] == '2'


@pytest.mark.filterwarnings('ignore:This DataLoader will create')
def test_loader_workers_reading_every_nth_sample_give_the_same_features(setup, tmp_path):
    root, export, _ = setup
    shards = str(root / 'shards')
    one, _ = _extract(export, shards, tmp_path / 'a', Ranks(), num_workers=0)
    four, _ = _extract(export, shards, tmp_path / 'b', Ranks(), num_workers=4)  # 4 slots > 3 shards: stride
    assert one.keys() == four.keys()
    np.testing.assert_allclose(one.rows(0, 80), four.rows(0, 80), rtol=0, atol=1e-5)


def test_cache_is_reused_and_knn_columns_are_the_backbone_output(setup, tmp_path):
    root, export, backbone = setup
    shards = str(root / 'shards')
    first, _ = _extract(export, shards, tmp_path, Ranks(), num_workers=0)
    stamp = first.path.stat().st_mtime_ns
    again, _ = _extract(export, shards, tmp_path, Ranks(), num_workers=0)
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp  # not extracted twice
    # independent truth: decode each image and run the backbone's forward (CLS after the final norm)
    from skipssl.data import EvalShards, eval_transform

    samples = sorted(
        EvalShards(open_split(shards, 'test').urls, eval_transform(16, 16, [0.5], [0.25]), channels=1),
        key=lambda s: s[2],
    )
    with torch.no_grad():
        expected = backbone.eval()(torch.stack([s[0] for s in samples])).numpy()
    np.testing.assert_allclose(first.rows(0, first.num, knn=True), expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(first.labels, [s[1] for s in samples])


def test_checkpoint_folder_and_export_of_the_same_teacher_agree(setup, tmp_path):
    root, export, backbone = setup
    run = tmp_path / 'run'
    teacher = {f'backbone.{k}': v for k, v in backbone.state_dict().items()}
    teacher['head.last_layer.weight'] = torch.zeros(8, 4)
    student = {k: v + 1.0 for k, v in teacher.items()}
    tmp = run / 'checkpoints' / '.ckpt-00000010.tmp'
    tmp.mkdir(parents=True)
    torch.save(
        {
            'student': student,
            'teacher': teacher,
            'model': {'name': MODEL, 'kwargs': KWARGS},
            'position': {'epoch': 1, 'iteration': 10, 'images_seen': 640, 'device_hours': 0.5},
            'data': DATA,
        },
        tmp / MODEL_FILE,
    )
    finalize_checkpoint(tmp, run / 'checkpoints' / 'ckpt-00000010', {'iteration': 10, 'world_size': 1})
    module, info = load_model(str(run))  # a run folder: its newest complete checkpoint, teacher backbone
    assert (info.kind, info.tag, info.which, info.run_dir) == ('checkpoint', '00000010', 'teacher', str(run.resolve()))
    assert (info.epoch, info.images_seen, info.device_hours, info.data['eval_crop']) == (1, 640, 0.5, 16)
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(module(x), backbone.eval()(x))
    student_module, student_info = load_model(str(run), which='student')
    assert student_info.which == 'student'
    with torch.no_grad():
        assert not torch.allclose(student_module(x), module(x))
    _, export_info = load_model(str(export))
    assert (export_info.kind, export_info.tag, export_info.device_hours_unit) == ('export', '00000010', 'core-hours')
    assert export_info.run_dir == str((root / 'run').resolve())
    assert os.path.basename(export_info.path) == 'teacher-00000010.safetensors'


def test_a_folder_holding_train_and_test_indices_is_read_by_role(tmp_path):
    write_shards(tmp_path, 'train', [5, 6], size=8)
    write_shards(tmp_path, 'test', [4], size=8, key_offset=100)
    train, test = open_split(str(tmp_path), 'train'), open_split(str(tmp_path), 'test')
    assert (train.num_samples, len(train.urls), test.num_samples, len(test.urls)) == (11, 2, 4, 1)
    for split in (train, test):
        verify_split(split, tmp_path / 'memo')
    assert train.name == test.name == tmp_path.name and train.digest != test.digest


@pytest.mark.parametrize('scheme', ['s3://', 'gs://', 'https://'])
def test_remote_shard_specs_are_never_taken_for_local_paths(scheme, tmp_path, monkeypatch):
    """A remote spec is neither resolved against the working folder (its 'bucket' is not a dataset name) nor
    hashed from disk: a local folder of the bucket's name must not be touched."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'bucket' / 'fmnist').mkdir(parents=True)
    split = open_split(f'{scheme}bucket/fmnist/test-{{000000..000001}}.tar', 'test')
    assert split.urls == [f'{scheme}bucket/fmnist/test-000000.tar', f'{scheme}bucket/fmnist/test-000001.tar']
    assert split.name == 'dataset' and split.num_samples is None
    verify_split(split, tmp_path / 'memo')
    assert split.digest and not (tmp_path / 'memo').exists()


def test_raw_pixels_take_the_preprocessing_of_the_run_they_belong_to(setup):
    root, _, _ = setup
    _, alone = load_model('pixels')
    assert data_settings(alone, {})['mean'] == [0.0] * 3 and data_settings(alone, {})['eval_crop'] == 224
    _, of_run = load_model('pixels', run_dir=str(root / 'run'))
    assert of_run.data == DATA
    assert data_settings(of_run, {}) == {**DATA, 'mean': [0.5], 'std': [0.25]}
    assert data_settings(of_run, {'eval_crop': 12})['eval_crop'] == 12  # the command line still wins


def _srun_task(rank, port, out):
    """One task as srun starts it without torchrun: SLURM's variables only, no RANK / WORLD_SIZE."""
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        os.environ.pop(key, None)
    os.environ.update(
        SLURM_PROCID=str(rank),
        SLURM_NTASKS=str(WORLD),
        SLURM_LOCALID=str(rank),
        SLURM_JOB_ID='7',
        MASTER_ADDR='127.0.0.1',
        MASTER_PORT=str(port),
    )  # the port a real job derives is shared
    ranks = from_env('cpu')
    try:
        torch.save((ranks.rank, ranks.world_size, gather_objects(rank * 10, ranks)), os.path.join(out, f'{rank}.pt'))
    finally:
        ranks.close()


def test_evaluation_ranks_under_srun_without_torchrun(tmp_path):
    """Each srun task joins one process group (it used to run as a lone rank 0, every task evaluating alone)."""
    mp.spawn(_srun_task, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    assert [torch.load(tmp_path / f'{r}.pt') for r in range(WORLD)] == [(0, 2, [0, 10]), (1, 2, None)]

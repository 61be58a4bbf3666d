"""The whole k-NN path on real shards: Fashion-MNIST's raw pixels as features give k-NN's known accuracy
(about 85%: scikit-learn's benchmark of k-NN on raw Fashion-MNIST pixels reports 85-86%)."""

import json
from pathlib import Path

import pytest

from skipssl_eval.pipeline import run_knn

FMNIST = Path('/usr/share/datasets/fashion-mnist')


@pytest.mark.slow
@pytest.mark.skipif(
    not (FMNIST / 't10k-images-idx3-ubyte.gz').is_file(),
    reason=f'Fashion-MNIST IDX files not installed in {FMNIST} (Debian package dataset-fashion-mnist)',
)
def test_raw_pixel_knn_on_fashion_mnist_shards(tmp_path):
    from skipssl.data.make_shards import write_shards
    from skipssl.data.sources import FashionMNISTSource

    for split in ('train', 'test'):
        write_shards(
            FashionMNISTSource(FMNIST, split), tmp_path / 'shards', split, max_bytes=0, workers=2, progress=False
        )
    [res] = run_knn(
        'pixels',
        str(tmp_path / 'shards' / 'train-index.json'),
        str(tmp_path / 'shards' / 'test-index.json'),
        out_dir=str(tmp_path / 'eval'),
        dataset='fmnist',
        channels=1,
        resize=28,
        crop=28,
        num_workers=2,
        batch_size=256,
    )
    assert (res['n_train'], res['n_test'], res['num_classes'], res['feature_dim']) == (60000, 10000, 10, 784)
    top1 = {int(k): v for k, v in res['top1'].items()}
    assert 84.0 < top1[10] < 87.0 and 83.5 < top1[20] < 86.5  # measured: 85.59, 84.59
    assert top1[10] > top1[20] > top1[100] > top1[200]  # raw pixels: fewer, closer neighbours are better
    assert all(98.0 < v <= 100.0 for v in res['top5'].values())
    assert Path(res['_path']).parent == tmp_path / 'eval' and Path(res['_path']).name.startswith('knn-pixels-fmnist-')
    saved = json.loads(Path(res['_path']).read_text())
    assert saved['top1'] == res['top1'] and saved['backend'] == 'faiss-cpu'
    assert list((tmp_path / 'eval' / 'tb').glob('events.out.tfevents.*.knn'))

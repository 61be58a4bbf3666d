"""The evaluators key their caches and results by the data's content: a test set relabelled under the same
shard names and sizes gets new features and its own result file; and their user errors are one line."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import knn_eval
import linear_probe
from skipssl.data.make_shards import write_shards as make_shards
from skipssl.data.sources import ImageFolderSource
from skipssl_eval.errors import EvalError
from skipssl_eval.features import FeatureFile
from skipssl_eval.pipeline import run_knn
from skipssl_eval.report import main as report_main
from skipssl_eval.synthetic import class_image, write_shards

ROOT = Path(__file__).resolve().parents[1]
PIXELS = dict(channels=1, resize=16, crop=16, ks=[5], num_workers=0, batch_size=64, dataset='toy')


def labelled_tree(root: Path, n: int, seed: int, relabel: int = 0) -> Path:
    """n images of 4 learnable classes; ``relabel`` files each image under class (label + relabel) % 4, with
    the same file name, so keys, labels and JSON keep their lengths."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = i % 4
        path = root / f'c{(label + relabel) % 4}' / f'img{seed}{i:03d}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(class_image(rng, label, 16, 1)).save(path)
    return root


def test_a_relabelled_test_set_gets_new_features_and_its_own_result(tmp_path):
    data = tmp_path / 'data'  # train and test indices in one folder, as make_shards leaves them
    make_shards(
        ImageFolderSource(labelled_tree(tmp_path / 'train', 48, seed=1)), data, 'train', progress=False, workers=1
    )
    make_shards(
        ImageFolderSource(labelled_tree(tmp_path / 'test', 20, seed=2)), data, 'test', progress=False, workers=1
    )
    shard = data / 'test-000000.tar'
    size, old_index = shard.stat().st_size, json.loads((data / 'test-index.json').read_text())
    run = dict(
        checkpoint='pixels', train_shards=str(data), test_shards=str(data), out_dir=str(tmp_path / 'out'), **PIXELS
    )
    [before] = run_knn(**run)
    assert before['top1']['5'] == 100.0

    # the same images, each filed under the next class: same shard name and size, other labels and bytes
    make_shards(
        ImageFolderSource(labelled_tree(tmp_path / 'relabelled', 20, seed=2, relabel=1), 'test'),
        data,
        'test',
        progress=False,
        workers=1,
        overwrite=True,
    )
    new_index = json.loads((data / 'test-index.json').read_text())
    assert shard.stat().st_size == size and [s['name'] for s in new_index['shards']] == ['test-000000.tar']
    assert new_index['shards'][0]['sha256'] != old_index['shards'][0]['sha256']

    [after] = run_knn(**run)
    assert after['top1']['5'] == 0.0  # every test image now carries its neighbours' class + 1
    fresh = run_knn(**{**run, 'out_dir': str(tmp_path / 'fresh')})[0]  # nothing cached: the truth
    assert after['top1'] == fresh['top1'] and after['data_digest'] == fresh['data_digest']
    test_files = [after['features']['files']['test'], before['features']['files']['test']]
    assert test_files[0] != test_files[1]
    labels = [{key.split('__')[1]: int(y) for key, y in zip(f.keys(), f.labels)} for f in map(FeatureFile, test_files)]
    assert labels[0] == {image: (y + 1) % 4 for image, y in labels[1].items()}  # by image, not by row
    # the train features were reused: their content did not change
    assert after['features']['files']['train'] == before['features']['files']['train']
    # both results kept, each naming the data it was computed on
    assert before['_path'] != after['_path'] and before['data_digest'] != after['data_digest']
    kept = json.loads(Path(before['_path']).read_text())
    assert kept['top1']['5'] == 100.0 and kept['data_digest'] == before['data_digest']
    assert Path(after['_path']).name == f'knn-pixels-toy-{after["data_digest"][:8]}.json'
    assert after['shards']['test']['digest'] != before['shards']['test']['digest']


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp('cli')
    write_shards(root / 'train', 'train', [24], size=16)
    write_shards(root / 'test', 'test', [12], size=16)
    return root


def one_line_error(err: str, prog: str) -> str:
    assert 'Traceback' not in err and err.count('\n') == 1 and err.startswith(f'{prog}: error: '), err
    return err


def test_evaluator_user_errors_are_one_line_and_exit_2(shards, tmp_path, capsys):
    junk = tmp_path / 'junk.safetensors'
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    out = subprocess.run(
        [
            sys.executable,
            'knn_eval.py',
            '--checkpoint',
            str(junk),
            '--train-shards',
            str(shards / 'train'),
            '--test-shards',
            str(shards / 'test'),
            '--k',
            '5',
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 2
    assert one_line_error(out.stderr, 'knn_eval.py').startswith(
        f'knn_eval.py: error: {junk} is not a readable safetensors file'
    )

    a_file = tmp_path / 'a-file'
    a_file.write_text('')
    common = [
        '--checkpoint',
        'pixels',
        '--train-shards',
        str(shards / 'train'),
        '--test-shards',
        str(shards / 'test'),
        '--channels',
        '1',
        '--resize',
        '16',
        '--crop',
        '16',
        '--num-workers',
        '0',
    ]
    assert linear_probe.main([*common, '--out-dir', str(a_file / 'results')]) == 2
    assert f'result folder {a_file}/results cannot be created' in one_line_error(
        capsys.readouterr().err, 'linear_probe.py'
    )
    assert knn_eval.main([*common, '--out-dir', str(tmp_path / 'r'), '--cache-dir', str(a_file), '--k', '5']) == 2
    assert f'feature cache {a_file} cannot be created' in one_line_error(capsys.readouterr().err, 'knn_eval.py')
    assert not list(tmp_path.rglob('*.safetensors.tmp*'))

    run = tmp_path / 'run'
    run.mkdir()
    (run / 'summary.json').write_text('{"run_name": ')
    assert report_main([str(run)]) == 2
    assert f'{run}/summary.json is unreadable' in one_line_error(capsys.readouterr().err, 'skipssl-report')


def _two_rank_knn(rank: int, root: str) -> None:
    dist.init_process_group('gloo', init_method=f'file://{root}/init', rank=rank, world_size=2)
    try:
        outcome = {}
        for name in ('good', 'overstated'):
            try:
                res = run_knn('pixels', f'{root}/{name}', f'{root}/{name}', out_dir=f'{root}/out-{name}', **PIXELS)
                outcome[name] = res[0]['top1'] if res else None
            except EvalError as exn:
                outcome[name] = f'EvalError: {exn}'
        Path(f'{root}/rank{rank}.json').write_text(json.dumps(outcome))
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_rank_0s_verdict_on_the_data(tmp_path):
    """Rank 0 reads the shards; the other ranks get its digests, or its error (none is left waiting)."""
    for name in ('good', 'overstated'):
        write_shards(tmp_path / name, 'train', [14, 10], size=16)
        write_shards(tmp_path / name, 'test', [9], size=16, key_offset=100)
    index = json.loads((tmp_path / 'overstated' / 'test-index.json').read_text())
    index['shards'][0]['num_samples'], index['num_samples'] = 12, 12  # fits the bytes: only reading tells
    (tmp_path / 'overstated' / 'test-index.json').write_text(json.dumps(index))
    mp.spawn(_two_rank_knn, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)]
    alone = run_knn(
        'pixels', str(tmp_path / 'good'), str(tmp_path / 'good'), out_dir=str(tmp_path / 'alone'), **PIXELS
    )[0]
    assert ranks[0]['good'] == alone['top1'] and ranks[1]['good'] is None
    assert ranks[0]['overstated'] == ranks[1]['overstated']
    assert ranks[0]['overstated'].startswith(
        f'EvalError: test shards {tmp_path}/overstated: shard '
        f'{tmp_path}/overstated/test-000000.tar holds 9 samples but its index'
    )

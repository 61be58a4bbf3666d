"""DINO's weighted k-NN on a faiss index, and on the torch search (here on the CPU; on CUDA in
bench.gpu_suite), against a brute-force numpy implementation of the same rule."""

import numpy as np
import pytest

from skipssl_eval import knn as knn_module
from skipssl_eval.errors import EvalError
from skipssl_eval.knn import Rows, TorchFlatIP, build_index, choose_backend, knn_classify, search
from skipssl_eval.synthetic import clustered_features

T = 0.07


def brute_force(train, train_labels, test, ks, temperature, num_classes):
    """The rule written out: the full similarity matrix; neighbours by similarity, ties by lower training
    index; each neighbour adds exp(sim / T) to its class, in neighbour order; classes by votes, ties by lower
    class index. Returns {k: (n_test, min(5, C)) class ranking}."""

    def normalise(x):
        x = x.astype(np.float32)
        return x / np.maximum(np.sqrt((x * x).sum(1)), 1e-12)[:, None]

    sims = normalise(test) @ normalise(train).T
    out = {}
    for k in ks:
        ranking = []
        for i in range(len(test)):
            nearest = sorted(range(len(train)), key=lambda j: (-sims[i, j], j))[:k]
            votes = [0.0] * num_classes
            for j in nearest:
                votes[train_labels[j]] += float(np.exp(np.float64(sims[i, j]) / temperature))
            ranking.append(sorted(range(num_classes), key=lambda c: (-votes[c], c))[: min(5, num_classes)])
        out[k] = np.array(ranking)
    return out


def accuracies(ranking, labels):
    return 100.0 * np.mean(ranking[:, 0] == labels), 100.0 * np.mean((ranking == labels[:, None]).any(1))


def exact_features(rng, n, dim=12):
    """Four entries of +-1 per row: normalised entries are +-0.5 and every similarity is a multiple of 0.25,
    exact in any summation order, so faiss and numpy see exactly the same ties."""
    x = np.zeros((n, dim), np.float32)
    for row in x:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    return x


BACKENDS = pytest.mark.parametrize('gpu', ['no', 'torch'], ids=['faiss-cpu', 'torch-cpu'])


@BACKENDS
def test_same_predictions_as_brute_force_on_random_features(gpu):
    train, ytr, centers = clustered_features(1500, 24, 10, spread=2.5, seed=1)
    test, yte, _ = clustered_features(150, 24, 10, spread=2.5, seed=2, centers=centers)
    ks = (1, 10, 20, 100, 200)
    got = knn_classify(Rows.of(train), ytr, Rows.of(test), yte, ks, T, query_batch=64, gpu=gpu)
    assert got.backend == {'no': 'faiss-cpu', 'torch': 'torch-cpu'}[gpu]
    ref = brute_force(train, ytr, test, ks, T, 10)
    for k in ks:
        np.testing.assert_array_equal(got.predictions[k], ref[k], err_msg=f'k={k}')
        top1, top5 = accuracies(ref[k], yte)
        assert got.top1[k] == pytest.approx(top1) and got.top5[k] == pytest.approx(top5)
    assert 20 < got.top1[20] < 100  # neither trivial nor chance: the rule is really exercised


@BACKENDS
def test_ties_between_neighbours_and_between_classes_resolve_like_the_reference(gpu, monkeypatch):
    monkeypatch.setattr(knn_module, 'TORCH_TILE_ELEMENTS', 7 * 64)  # torch: training tiles of 64 rows, merged
    rng = np.random.default_rng(0)
    base = exact_features(rng, 60)
    train = np.concatenate([base, base, base[:20]])  # duplicates: many neighbours tie exactly
    ytr = rng.integers(0, 3, len(train))
    test = exact_features(rng, 80)
    yte = rng.integers(0, 3, len(test))
    ks = (1, 2, 5, 10, 50)
    got = knn_classify(Rows.of(train), ytr, Rows.of(test), yte, ks, T, query_batch=7, gpu=gpu)
    ref = brute_force(train, ytr, test, ks, T, 3)
    for k in ks:
        np.testing.assert_array_equal(got.predictions[k], ref[k], err_msg=f'k={k}')
    # the test is only worth something if ties really occur at the k-th place and between class votes
    sims = test / 2 @ (train / 2).T
    ordered = -np.sort(-sims, axis=1)
    assert (ordered[:, 9] == ordered[:, 10]).mean() > 0.5
    one_neighbour_ties = sum(
        ordered[i, 0] == ordered[i, 1] and len({ytr[j] for j in np.nonzero(sims[i] == ordered[i, 0])[0]}) > 1
        for i in range(len(test))
    )
    assert one_neighbour_ties > 0


def test_k_larger_than_the_number_of_classes():
    train, ytr, centers = clustered_features(400, 8, 2, spread=3.0, seed=3)
    test, yte, _ = clustered_features(50, 8, 2, spread=3.0, seed=4, centers=centers)
    ks = (5, 100, 400)
    got = knn_classify(Rows.of(train), ytr, Rows.of(test), yte, ks, T)
    ref = brute_force(train, ytr, test, ks, T, 2)
    for k in ks:
        assert got.predictions[k].shape == (50, 2)
        np.testing.assert_array_equal(got.predictions[k], ref[k])
        assert got.top5[k] == 100.0  # with 2 classes, the top-5 holds both


@pytest.mark.parametrize('kind', ['faiss', 'torch'])
def test_a_tie_group_larger_than_the_fetch_is_resolved_by_training_index(kind, monkeypatch):
    monkeypatch.setattr(knn_module, 'TORCH_TILE_ELEMENTS', 16)  # torch: the tie group spans many tiles
    rng = np.random.default_rng(5)
    other = exact_features(rng, 200)
    same = np.zeros((1, 12), np.float32)
    same[0, :4] = 1.0
    other = other[(other @ same.T)[:, 0] < 4]  # nothing else is as similar as the copies
    train = np.concatenate([other[:50], np.repeat(same, 40, 0), other[50:]])
    rows = Rows.of(train / 2)
    index = build_index(rows, use_gpu=False) if kind == 'faiss' else TorchFlatIP(rows, 'cpu')
    sims, ids, unresolved = search(index, same / 2, 10)
    assert unresolved == 0
    np.testing.assert_array_equal(ids[0], np.arange(50, 60))  # the 10 lowest-indexed of 40 exact ties
    assert (sims == 1.0).all()


def test_query_batch_size_does_not_change_the_result():
    train, ytr, centers = clustered_features(800, 16, 5, spread=2.0, seed=6)
    test, yte, _ = clustered_features(97, 16, 5, spread=2.0, seed=7, centers=centers)
    a = knn_classify(Rows.of(train), ytr, Rows.of(test), yte, (10, 20), T, query_batch=1)
    b = knn_classify(Rows.of(train), ytr, Rows.of(test), yte, (10, 20), T, query_batch=10_000)
    for k in (10, 20):
        np.testing.assert_array_equal(a.predictions[k], b.predictions[k])


def test_bad_k_and_labels_fail_with_a_message():
    train, ytr, _ = clustered_features(30, 4, 3, seed=8)
    with pytest.raises(EvalError, match='k=200 is larger than the training set \\(30 samples\\)'):
        knn_classify(Rows.of(train), ytr, Rows.of(train), ytr, (10, 200))
    with pytest.raises(EvalError, match='positive'):
        knn_classify(Rows.of(train), ytr, Rows.of(train), ytr, (0, 10))
    with pytest.raises(EvalError, match='labelled'):
        knn_classify(Rows.of(train), -np.ones(30, np.int64), Rows.of(train), ytr, (10,))


def test_backend_choice_without_a_gpu():
    """On a machine without CUDA and with faiss-cpu: auto is faiss's CPU index; torch runs on the CPU."""
    import torch

    if torch.cuda.is_available():
        pytest.skip('a CUDA device is present: auto would choose it')
    assert choose_backend('auto') == 'faiss-cpu' and choose_backend('no') == 'faiss-cpu'
    assert choose_backend('torch') == 'torch-cpu'
    with pytest.raises(EvalError, match='no GPU support'):
        choose_backend('yes')
    with pytest.raises(EvalError, match='gpu must be one of'):
        choose_backend('maybe')

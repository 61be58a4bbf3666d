"""The bf16 shortlist search (eval/knn_shortlist.py) against the exact flat search and the brute-force rule:
same neighbours, similarities and predictions, including near-ties closer than bf16 can tell apart."""

import numpy as np
import pytest
import torch

from skipssl_eval.knn import Rows, TorchFlatIP, build_index, knn_classify, l2_normalize, search
from skipssl_eval.knn_shortlist import ShortlistIP, bf16_error_bound
from skipssl_eval.synthetic import clustered_features
from tests.test_eval_knn import T, brute_force, exact_features


def test_the_error_bound_holds_for_bf16_gemm_similarities():
    rng = np.random.default_rng(0)
    dim = 384
    dense = rng.standard_normal((300, dim)).astype(np.float32)
    spiky = dense * (rng.random((300, dim)) < 0.02)  # few large entries: the worst relative rounding
    rows = l2_normalize(np.concatenate([dense, spiky + 1e-3]))
    x = torch.from_numpy(rows)
    approx = (x.bfloat16() @ x.bfloat16().T).double().numpy()
    exact = rows.astype(np.float64) @ rows.astype(np.float64).T
    bound = bf16_error_bound(dim, np.abs(approx))
    assert (np.abs(approx - exact) <= bound).all()
    assert (np.abs(approx - exact) / bound).max() > 0.05  # the bound is not vacuous: bf16 really errs by this much


def index_of(kind, rows):
    return build_index(rows, use_gpu=False) if kind == 'faiss' else TorchFlatIP(rows, 'cpu')


def shortlist_of(kind, index, **kw):
    from skipssl_eval.knn import flat_rows

    xb = torch.from_numpy(flat_rows(index)) if kind == 'faiss' else index.xb
    return ShortlistIP(xb, index, **kw)


@pytest.mark.parametrize('kind', ['faiss', 'torch'])
@pytest.mark.parametrize('tile_rows,shortlist', [(45, 3), (512, 1.5)], ids=['narrow-tiles', 'grouped-selection'])
def test_near_ties_closer_than_bf16_resolves_fall_back_and_match_the_exact_search(kind, tile_rows, shortlist):
    """Rows at similarities 0.5 + j * 1e-4 to the query: bf16 cannot order them, so the margin check must send the
    query to the exact index; well-separated queries stay on the fast path."""
    dim, n = 64, 400
    rng = np.random.default_rng(1)
    cos = 0.5 + 1e-4 * rng.permutation(n)
    side = np.zeros((n, dim), np.float32)
    side[np.arange(n), 1 + np.arange(n) % (dim - 1)] = 1.0
    train = np.concatenate(
        [
            cos[:, None] * np.eye(dim, dtype=np.float32)[0] + np.sqrt(1 - cos**2)[:, None] * side,
            l2_normalize(rng.standard_normal((600, dim)).astype(np.float32)),
        ]
    ).astype(np.float32)
    queries = np.concatenate([np.eye(dim, dtype=np.float32)[:1], train[n : n + 30] + 0.01]).astype(np.float32)
    index = index_of(kind, Rows.of(train))
    # 45-row tiles are narrower than the shortlist; 512-row tiles of 32 groups take the two-stage selection
    fast = shortlist_of(kind, index, shortlist=shortlist, query_block=7, tile_rows=tile_rows)
    for k in (1, 10, 50):
        want_s, want_i, _ = search(index, l2_normalize(queries), k)
        got_s, got_i, _ = search(fast, l2_normalize(queries), k)
        np.testing.assert_array_equal(got_i, want_i, err_msg=f'k={k}')
        np.testing.assert_allclose(got_s, want_s, rtol=0, atol=1e-6)
    assert 0 < fast.fallbacks < fast.queries
    assert fast.fallbacks >= 3  # the near-tie query, at every k


@pytest.mark.parametrize('gpu', ['no', 'torch'])
def test_same_predictions_as_brute_force_through_the_shortlist(gpu):
    train, ytr, centers = clustered_features(1500, 24, 10, spread=2.5, seed=1)
    test, yte, _ = clustered_features(150, 24, 10, spread=2.5, seed=2, centers=centers)
    ks = (1, 10, 20, 100)
    got = knn_classify(Rows.of(train), ytr, Rows.of(test), yte, ks, T, query_batch=64, gpu=gpu, shortlist=1.5)
    assert got.backend.endswith('+bf16-shortlist1.5') and got.fallbacks is not None
    ref = brute_force(train, ytr, test, ks, T, 10)
    for k in ks:
        np.testing.assert_array_equal(got.predictions[k], ref[k], err_msg=f'k={k}')


def test_exact_ties_resolve_like_the_reference_through_the_shortlist():
    rng = np.random.default_rng(0)
    base = exact_features(rng, 60)
    train = np.concatenate([base, base, base[:20]])  # duplicates: many neighbours tie exactly
    ytr = rng.integers(0, 3, len(train))
    test = exact_features(rng, 80)
    yte = rng.integers(0, 3, len(test))
    ks = (1, 2, 5, 10)
    got = knn_classify(Rows.of(train), ytr, Rows.of(test), yte, ks, T, query_batch=7, gpu='no', shortlist=4)
    ref = brute_force(train, ytr, test, ks, T, 3)
    for k in ks:
        np.testing.assert_array_equal(got.predictions[k], ref[k], err_msg=f'k={k}')


def test_a_negative_shortlist_is_refused():
    from skipssl_eval.errors import EvalError

    x = np.eye(4, dtype=np.float32)
    with pytest.raises(EvalError, match='shortlist'):
        knn_classify(Rows.of(x), np.arange(4), Rows.of(x), np.arange(4), (1,), shortlist=0.5)


def test_the_two_stage_tile_selection_finds_the_tile_top_and_a_valid_bound():
    from skipssl_eval.knn_shortlist import GROUP

    gen = torch.Generator().manual_seed(0)
    sims = torch.randn(50, GROUP * 40, generator=gen).bfloat16()
    s, i, bound = ShortlistIP._tile_top(sims, 7)
    want_s, _ = sims.topk(7, dim=1)
    assert torch.equal(s, want_s) and torch.equal(sims.gather(1, i), s)
    assert bool(torch.isfinite(bound).all())  # the two-stage path ran (a plain top-k gives no bound)
    # every column a left-out group holds is <= the bound; the groups' maxima at the bound really are left out
    left_out = torch.ones_like(sims, dtype=torch.bool).scatter(1, i, False)
    assert bool((sims.float().masked_fill(~left_out, -1e9).amax(1) <= torch.maximum(bound, s[:, -1].float())).all())
    assert bool((bound <= s[:, -1].float()).all())

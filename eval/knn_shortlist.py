"""Exact top-k inner-product search through a bfloat16 shortlist: a bf16 GEMM (AMX / AVX512-BF16 on recent
Xeons, tensor cores on GPUs) ranks every training row, the best ``shortlist x k`` of each query are re-scored in
float32, and a query whose shortlist might have missed a true neighbour is searched again by the exact index.

Why it is exact: with unit-norm float32 rows q and x, bf16 rounding of both inputs (relative error u = 2^-8 each),
float32 accumulation over D terms and the bf16 rounding of the product s differ from q.x by at most
``bf16_error_bound(D, s)`` (Cauchy-Schwarz bounds sum |q_i x_i| by 1). Every row left out of the shortlist has an
approximate similarity <= tau, the shortlist's last approximate similarity, so its true similarity is <= tau + eps.
If the k-th exact similarity in the shortlist is > tau + eps, no row outside can reach or tie the k-th place: the
shortlist holds the true top-k and its whole tie group at the k-th place, and the re-scored top-k is the exact one
(ties ordered by ``knn.search`` exactly as for the flat index). Queries failing the check go to the exact index.

Memory: a bf16 copy of the training rows (N x D x 2 bytes) next to the float32 ones the exact index already
holds, plus per query block (query_block x tile_rows) bf16 similarities and (query_block x L x D) float32 rows
gathered for the re-scoring, in sub-blocks of RESCORE_ELEMENTS.
"""

import math
from contextlib import contextmanager
from typing import Tuple

import numpy as np

BF16_UNIT_ROUNDOFF = 2.0**-8
FP32_UNIT_ROUNDOFF = 2.0**-24
RESCORE_ELEMENTS = 1 << 24  # float32 values gathered at once for the re-scoring: 64 MiB
GROUP = 8  # training rows per group in the two-stage selection of a tile


def bf16_error_bound(dim: int, sim=1.0):
    """Upper bound on |bf16 GEMM similarity - float32 similarity| for rows of norm <= 1 whose bf16 similarity is
    ``sim`` (a float or tensor; plus float32 rounding of the normalisation, covered by the 1.01 factors): two
    input roundings, the output rounding (relative to |sim|), and the float32 accumulation of the approximate and
    of the exact product."""
    u = BF16_UNIT_ROUNDOFF
    return 1.01 * (2 * u + u * u + u * abs(sim)) + 2.02 * dim * FP32_UNIT_ROUNDOFF


@contextmanager
def _full_precision_accumulation():
    """cuBLAS may otherwise reduce bf16 GEMMs in bf16 (split-K), and TF32 would round the float32 re-scoring."""
    import torch

    reduced = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.set_float32_matmul_precision('highest')
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reduced
        torch.set_float32_matmul_precision(precision)


class ShortlistIP:
    """An exact index's interface (``ntotal``, ``search(queries, k) -> (sims, ids)``, any valid top-k) answered by
    a bf16 shortlist re-scored in float32 (see the module docstring); ``exact`` answers the queries the margin
    check rejects. ``xb`` is the (N, D) float32 tensor of normalised training rows (on the CPU or a GPU) that
    ``exact`` searches; it is read, not copied. Counters: ``queries`` searched, ``fallbacks`` sent to ``exact``."""

    def __init__(
        self,
        xb,
        exact,
        shortlist: float = 1.5,
        query_block: int = 1024,
        tile_rows: int = 1 << 16,
        chunk_rows: int = 1 << 16,
    ):
        import torch

        if not shortlist > 1:
            raise ValueError(f'shortlist must be a multiple of k above 1, got {shortlist}')
        self.xb, self.exact, self.shortlist = xb, exact, shortlist
        self.query_block, self.tile_rows = query_block, tile_rows
        self.ntotal, self.dim = xb.shape
        self.xb16 = torch.empty((self.ntotal, self.dim), dtype=torch.bfloat16, device=xb.device)
        for start in range(0, self.ntotal, chunk_rows):  # chunked: no second float32-sized temporary
            self.xb16[start : start + chunk_rows] = xb[start : start + chunk_rows]
        self.queries = self.fallbacks = 0

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        import torch

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        width = min(self.ntotal, math.ceil(self.shortlist * k))
        if width <= k:  # the shortlist would be the whole top-k: nothing to gain, and no margin to check
            return self.exact.search(queries, k)
        sims = np.empty((len(queries), k), np.float32)
        ids = np.empty((len(queries), k), np.int64)
        with _full_precision_accumulation():
            for start in range(0, len(queries), self.query_block):
                q = torch.from_numpy(queries[start : start + self.query_block]).to(self.xb.device)
                s, i, ok = self._block(q, k, width)
                sims[start : start + len(q)], ids[start : start + len(q)] = s.cpu().numpy(), i.cpu().numpy()
                bad = start + np.nonzero(~ok.cpu().numpy())[0]
                if bad.size:
                    sims[bad], ids[bad] = self.exact.search(queries[bad], k)
                self.fallbacks += int(bad.size)
        self.queries += len(queries)
        return sims, ids

    @staticmethod
    def _tile_top(sims, width: int):
        """The ``width`` largest of each row of ``sims`` (bf16) and their columns, found in two stages because a
        full-width top-k costs several times the GEMM: the rows' maxima over groups of GROUP columns, the
        ``width`` best groups, the best ``width`` columns inside them. A group is the columns c, c + cols/GROUP,
        c + 2 cols/GROUP, ...: its maximum is an element-wise max of GROUP contiguous slices, which vectorises
        (a max over GROUP adjacent columns runs 4x slower). A column in a group left out is <= the returned
        bound (the last kept group's maximum), which the margin check takes into account."""
        import torch

        rows, cols = sims.shape
        if cols % GROUP or cols // GROUP <= width:
            s, i = sims.topk(min(width, cols), dim=1)
            return s, i, torch.full((rows,), -math.inf, device=sims.device)
        stride = cols // GROUP
        peaks, groups = sims.view(rows, GROUP, stride).amax(1).topk(width, dim=1)
        cand = (groups[:, :, None] + stride * torch.arange(GROUP, device=sims.device)).view(rows, -1)
        s, j = sims.gather(1, cand).topk(width, dim=1)
        return s, cand.gather(1, j), peaks[:, -1].float()

    def _block(self, q, k: int, width: int):
        """Exact top-k of one query block, and which rows passed the margin check."""
        import torch

        q16 = q.to(torch.bfloat16)
        best_s = best_i = None
        dropped = torch.full((len(q),), -math.inf, device=q.device)  # bound on rows a tile's groups dropped
        for start in range(0, self.ntotal, self.tile_rows):
            tile = self.xb16[start : start + self.tile_rows]
            s, i, bound = self._tile_top(q16 @ tile.T, width)
            dropped = torch.maximum(dropped, bound)
            i += start
            if best_s is not None:
                s = torch.cat([best_s, s], 1)
                s, j = s.topk(min(width, s.shape[1]), dim=1)
                i = torch.cat([best_i, i], 1).gather(1, j)
            best_s, best_i = s, i
        tau = torch.maximum(best_s[:, -1].float(), dropped)
        sims = torch.empty((len(q), k), dtype=torch.float32, device=q.device)
        ids = torch.empty((len(q), k), dtype=torch.int64, device=q.device)
        ok = torch.empty(len(q), dtype=torch.bool, device=q.device)
        rows = max(1, RESCORE_ELEMENTS // (width * self.dim))
        for a in range(0, len(q), rows):
            b = slice(a, a + rows)
            sims[b], ids[b], ok[b] = self._rescore(q[b], best_s[b].float(), best_i[b], tau[b], k)
        return sims, ids, ok

    def _rescore(self, q, approx, cand, tau, k: int):
        """Float32 similarities of the shortlist's leading columns, sorted like ``knn.search``, and the margin check.
        Gathering float32 rows is the re-scoring's cost, so only the columns whose bf16 similarity is within twice
        the error bound of the k-th are re-scored (the widest such prefix in the sub-block); the columns after the
        prefix then bound the rows left out, like tau for the rows outside the shortlist."""
        import torch

        kth = approx[:, k - 1]
        near = approx >= (kth - 2 * bf16_error_bound(self.dim, kth.abs()))[:, None]
        width = min(approx.shape[1], max(k + 1, int(near.sum(1).max()) + 1))
        if width < approx.shape[1]:
            tau = torch.maximum(tau, approx[:, width])  # topk's columns are sorted: later ones are <= this one
        cand = cand[:, :width]
        rows = self.xb.index_select(0, cand.reshape(-1)).view(*cand.shape, self.dim)  # 25% faster than xb[cand]
        exact = torch.einsum('bd,bld->bl', q, rows)
        # by training index, then (stable) by similarity descending: ties keep the lower index first
        by_id, order = cand.sort(dim=1)
        exact, order = exact.gather(1, order).sort(dim=1, descending=True, stable=True)
        ids = by_id.gather(1, order)
        # a row left out has bf16 similarity a <= tau, so float32 similarity <= a + bound(a) <= tau + bound(tau)
        ok = exact[:, k - 1] > tau + bf16_error_bound(self.dim, tau.abs())
        return exact[:, :k], ids[:, :k], ok

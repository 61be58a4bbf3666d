"""DINO's weighted k-NN classifier with an exact inner-product index: faiss (CPU, or GPU where faiss has GPU
support), or torch matmuls on a CUDA device when faiss has none (``TorchFlatIP``).

Features are L2-normalised, so inner product = cosine similarity. Each query's ``max(ks)`` nearest training
features vote for their class with weight exp(sim / T) (T = 0.07); every k in ``ks`` is scored from the same
search (its first k neighbours). Ties are resolved deterministically, the same way the brute-force reference
in the tests does: neighbours with equal similarity by lower training index, classes with equal votes by lower
class index. faiss keeps an arbitrary subset of the neighbours tied at the k-th place, so each search fetches
one extra neighbour and a query whose k-th and (k+1)-th similarity tie is searched again with a larger k.

Memory: the index holds the training features (N x D float32: 1.28M x 384 = 1.97 GB), read from the cache
in chunks and normalised chunk by chunk; queries go in batches, so the rest is O(batch x (D + k)) plus
faiss's BLAS tile (4096 x 1024 floats). The similarity matrix is never materialised.

Backends (``gpu``): 'auto' takes faiss's GPU index where faiss has GPU support, else torch on CUDA where a
CUDA device is present, else faiss's CPU index; 'yes' / 'no' force faiss GPU / CPU; 'torch' the torch search
(on CUDA if present, else on the CPU: how CI covers it). Every backend only has to return a valid top-k; the
tie rules above are applied to all of them by the same code (``search``).
"""

import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from .errors import EvalError

log = logging.getLogger(__name__)

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07
GPU_MAX_K = 2048  # faiss's GPU k-selection limit
GPU_OPTIONS = ('auto', 'yes', 'no', 'torch')
TORCH_TILE_ELEMENTS = 1 << 27  # similarities per (query block x training tile): 512 MiB of float32
VOTE_ELEMENTS = 1 << 25  # class votes per query batch (float64: 256 MiB): fewer queries a batch for many classes
_GPU = {}


@dataclass
class Rows:
    """A (num, dim) float32 matrix read in row blocks: an array, or a feature cache read from disk."""

    num: int
    dim: int
    read: Callable[[int, int], np.ndarray]

    @classmethod
    def of(cls, array: np.ndarray) -> 'Rows':
        array = np.asarray(array)
        return cls(array.shape[0], array.shape[1], lambda a, b: array[a:b])


@dataclass
class KnnResult:
    ks: Tuple[int, ...]
    temperature: float
    top1: Dict[int, float]
    top5: Dict[int, float]
    n_train: int
    n_test: int
    num_classes: int
    backend: str
    seconds: Dict[str, float] = field(default_factory=dict)
    predictions: Optional[Dict[int, np.ndarray]] = None  # per k: (n_test, min(5, C)) class ranking
    fallbacks: Optional[int] = None  # bf16 shortlist: searches the margin check sent to the exact index

    def summary(self) -> Dict:
        return {
            'k': list(self.ks),
            'temperature': self.temperature,
            'top1': {str(k): v for k, v in self.top1.items()},
            'top5': {str(k): v for k, v in self.top5.items()},
            'n_train': self.n_train,
            'n_test': self.n_test,
            'num_classes': self.num_classes,
            'backend': self.backend,
            'seconds': self.seconds,
            **({} if self.fallbacks is None else {'shortlist_fallbacks': self.fallbacks}),
        }


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise x / max(||x||, 1e-12) in float32 (torch's F.normalize); a copy."""
    x = np.array(x, dtype=np.float32, copy=True)
    norms = np.sqrt(np.einsum('ij,ij->i', x, x, dtype=np.float32))
    x /= np.maximum(norms, 1e-12)[:, None]
    return x


def faiss_gpus() -> int:
    try:
        import faiss
    except ImportError:  # a GPU machine may carry no faiss: the torch search needs none
        return 0
    return faiss.get_num_gpus() if hasattr(faiss, 'StandardGpuResources') else 0


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_backend(gpu: str) -> str:
    """'faiss-gpu', 'faiss-cpu', 'torch-cuda' or 'torch-cpu' for ``gpu`` in GPU_OPTIONS."""
    if gpu not in GPU_OPTIONS:
        raise EvalError(f'gpu must be one of {", ".join(GPU_OPTIONS)}, got {gpu!r}')
    if gpu == 'torch':
        return 'torch-cuda' if cuda_available() else 'torch-cpu'
    if gpu == 'yes' and faiss_gpus() == 0:
        raise EvalError('a faiss GPU index was asked for, but this faiss has no GPU support (faiss-cpu)')
    if gpu == 'yes' or (gpu == 'auto' and faiss_gpus() > 0):
        return 'faiss-gpu'
    if gpu == 'auto' and cuda_available():
        return 'torch-cuda'
    return 'faiss-cpu'


@contextmanager
def _ieee_fp32():
    """Full float32 matmuls: TF32 (which the benchmarks and the trainer switch on) would round the
    similarities to 10 mantissa bits and reorder neighbours."""
    import torch

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('highest')
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class TorchFlatIP:
    """Exact inner-product search with torch matmuls on ``device``, with a faiss flat index's interface
    (``ntotal``, ``search(queries, k) -> (sims, ids)`` as numpy, any valid top-k), so ``search`` below orders
    ties for it exactly as for faiss. The normalised training rows live on the device; each query block is
    scored against training tiles of at most TORCH_TILE_ELEMENTS similarities and the tiles' top-k merged."""

    def __init__(self, train: Rows, device, chunk_rows: int = 1 << 16):
        import torch

        self.device = torch.device(device)
        self.ntotal = train.num
        self.xb = torch.empty((train.num, train.dim), dtype=torch.float32, device=self.device)
        for start in range(0, train.num, chunk_rows):
            stop = min(start + chunk_rows, train.num)
            self.xb[start:stop] = torch.from_numpy(l2_normalize(train.read(start, stop)))

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        import torch

        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        tile = max(k, TORCH_TILE_ELEMENTS // max(len(q), 1))
        best_sims = best_ids = None
        with _ieee_fp32():
            for start in range(0, self.ntotal, tile):
                sims = q @ self.xb[start : start + tile].T
                s, i = sims.topk(min(k, sims.shape[1]), dim=1)
                i += start
                if best_sims is not None:
                    s, i = torch.cat([best_sims, s], 1), torch.cat([best_ids, i], 1)
                    s, j = s.topk(k, dim=1)
                    i = i.gather(1, j)
                best_sims, best_ids = s, i
        return best_sims.cpu().numpy(), best_ids.cpu().numpy()


def build_index(train: Rows, use_gpu: bool, chunk_rows: int = 1 << 16):
    """Exact inner-product index (flat) over the normalised training rows, filled chunk by chunk."""
    import faiss

    if use_gpu:
        if 'res' not in _GPU:  # one set of GPU resources (streams, scratch memory) per process, kept alive
            _GPU['res'] = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(_GPU['res'], train.dim)
        for start in range(0, train.num, chunk_rows):
            index.add(l2_normalize(train.read(start, min(start + chunk_rows, train.num))))
        return index
    # CPU: allocate the flat storage once at its final size and write the normalised chunks into it;
    # add() per chunk grows a std::vector by doubling, which costs a second copy of the index at its peak
    index = faiss.IndexFlatIP(train.dim)
    nbytes = train.num * train.dim * 4
    index.codes.resize(nbytes)
    xb = flat_rows(index)
    for start in range(0, train.num, chunk_rows):
        stop = min(start + chunk_rows, train.num)
        xb[start:stop] = l2_normalize(train.read(start, stop))
    index.ntotal = train.num
    return index


def flat_rows(index) -> np.ndarray:
    """The (ntotal, d) float32 rows a faiss CPU flat index stores, as a numpy view (no copy)."""
    import faiss

    n = index.codes.size() // (4 * index.d)
    return faiss.rev_swig_ptr(index.codes.data(), n * index.d * 4).view(np.float32).reshape(n, index.d)


def shortlist_index(index, backend: str, shortlist: float):
    """``index`` behind a bf16 shortlist re-scored exactly (knn_shortlist.ShortlistIP), sharing its rows."""
    import torch

    from .knn_shortlist import ShortlistIP

    xb = index.xb if backend.startswith('torch') else torch.from_numpy(flat_rows(index)[: index.ntotal])
    return ShortlistIP(xb, index, shortlist)


def sort_neighbours(sims: np.ndarray, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Each row by similarity, descending, then by training index, ascending."""
    order = np.lexsort((ids, -sims), axis=1)
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


def search(index, queries: np.ndarray, k: int, max_k: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, int]:
    """(similarities, ids) of the k nearest, ties ordered by index as if all similarities were sorted;
    and the number of queries whose tie at the k-th place could not be resolved within ``max_k``."""
    ntotal = index.ntotal
    limit = min(ntotal, max_k or ntotal)
    kq = min(k + 1, limit)
    sims, ids = sort_neighbours(*index.search(queries, kq))
    unresolved = 0
    if kq < ntotal:
        # the (k+1)-th ties the k-th: faiss may have dropped other tied ones; fetch more until the tie group ends
        pending = np.nonzero(sims[:, k - 1] == sims[:, kq - 1])[0]
        kk = kq
        while pending.size:
            if kk >= limit:
                unresolved = int(pending.size) if kk < ntotal else 0
                break
            kk = min(2 * kk, limit)
            s2, i2 = sort_neighbours(*index.search(queries[pending], kk))
            sims[pending], ids[pending] = s2[:, :kq], i2[:, :kq]
            pending = pending[(s2[:, k - 1] == s2[:, kk - 1]) & (kk < ntotal)]
    return sims[:, :k], ids[:, :k], unresolved


def knn_classify(
    train: Rows,
    train_labels: np.ndarray,
    test: Rows,
    test_labels: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: Optional[int] = None,
    query_batch: int = 8192,
    gpu: str = 'auto',
    keep_predictions: bool = True,
    progress: Optional[Callable[[str], None]] = None,
    shortlist: float = 0,
) -> KnnResult:
    """DINO's weighted k-NN top-1 / top-5 for every k in ``ks`` in one search of max(ks) neighbours.
    ``shortlist`` > 1: the search goes through a bf16 shortlist of ceil(shortlist x k) candidates re-scored in float32,
    with the exact index for the queries whose margin check fails (knn_shortlist): the same neighbours, faster
    where bf16 GEMMs are (AMX / AVX512-BF16 CPUs, GPUs). faiss's GPU index has no shared rows, so a shortlist on
    a GPU uses the torch search."""
    ks = tuple(sorted(set(int(k) for k in ks)))
    if not ks or ks[0] < 1:
        raise EvalError(f'k must be positive integers, got {list(ks)}')
    if temperature <= 0:
        raise EvalError(f'temperature must be positive, got {temperature}')
    if train.num == 0 or test.num == 0:
        raise EvalError(f'empty feature set (train {train.num}, test {test.num})')
    if ks[-1] > train.num:
        raise EvalError(f'k={ks[-1]} is larger than the training set ({train.num} samples)')
    if train.dim != test.dim:
        raise EvalError(f'train features have {train.dim} dimensions, test features {test.dim}')
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    if len(train_labels) != train.num or len(test_labels) != test.num:
        raise EvalError('one label per feature row is needed')
    if min(train_labels.min(), test_labels.min()) < 0:
        raise EvalError('negative labels: k-NN evaluation needs labelled data')
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if shortlist and not shortlist > 1:
        raise EvalError(f'shortlist must be 0 (exact search) or a multiple of k above 1, got {shortlist}')
    backend = choose_backend(gpu)
    if shortlist and backend == 'faiss-gpu':
        if gpu == 'yes':
            raise EvalError("a bf16 shortlist runs on the torch search on a GPU, not on faiss's GPU index")
        backend = 'torch-cuda'
    kmax, top = ks[-1], min(5, num_classes)
    query_batch = max(1, min(query_batch, VOTE_ELEMENTS // num_classes))

    t0 = time.perf_counter()
    if backend.startswith('torch'):
        index = TorchFlatIP(train, backend.split('-')[1])
    else:
        index = build_index(train, backend == 'faiss-gpu')
    if shortlist:
        index = shortlist_index(index, backend, shortlist)
    t_add = time.perf_counter() - t0
    correct1 = {k: 0 for k in ks}
    correct5 = {k: 0 for k in ks}
    preds = {k: np.empty((test.num, top), np.int64) for k in ks} if keep_predictions else None
    t_search = t_vote = 0.0
    unresolved, last_report = 0, time.perf_counter()
    for start in range(0, test.num, query_batch):
        stop = min(start + query_batch, test.num)
        t1 = time.perf_counter()
        sims, ids, bad = search(
            index, l2_normalize(test.read(start, stop)), kmax, GPU_MAX_K if backend == 'faiss-gpu' else None
        )
        unresolved += bad
        t2 = time.perf_counter()
        y = test_labels[start:stop]
        neighbour_labels = train_labels[ids]
        weights = np.exp(sims.astype(np.float64) / temperature)
        votes = np.zeros((stop - start, num_classes), np.float64)
        rows = np.arange(stop - start)
        for j in range(kmax):  # in neighbour order: the sums are the same floats as the reference's
            votes[rows, neighbour_labels[:, j]] += weights[:, j]
            if j + 1 in correct1:
                ranking = np.argsort(-votes, axis=1, kind='stable')[:, :top]
                correct1[j + 1] += int((ranking[:, 0] == y).sum())
                correct5[j + 1] += int((ranking == y[:, None]).any(1).sum())
                if preds is not None:
                    preds[j + 1][start:stop] = ranking
        t_vote += time.perf_counter() - t2
        t_search += t2 - t1
        if time.perf_counter() - last_report > 30:
            last_report = time.perf_counter()
            progress(f'[knn] {stop}/{test.num} queries, {t_search:.0f} s searching')
    if unresolved:
        log.warning(
            '%d queries have more neighbours tied at the k-th place than the GPU index returns; '
            'their ties are broken arbitrarily',
            unresolved,
        )
    if shortlist:
        backend += f'+bf16-shortlist{shortlist}'
        log.info('bf16 shortlist: %d of %d searches fell back to the exact index', index.fallbacks, index.queries)
    return KnnResult(
        ks,
        temperature,
        {k: 100.0 * c / test.num for k, c in correct1.items()},
        {k: 100.0 * c / test.num for k, c in correct5.items()},
        train.num,
        test.num,
        num_classes,
        backend,
        {'index': round(t_add, 3), 'search': round(t_search, 3), 'vote': round(t_vote, 3)},
        preds,
        index.fallbacks if shortlist else None,
    )

"""The pretraining stream in virtual slots: global batches that do not depend on the number of ranks or loader
workers that compute them, so a run can resume on another number of ranks as the same experiment.

An epoch's stream is cut into ``n_slots`` virtual slots, fixed when the run starts (``data.virtual_slots``) and
recorded with its checkpoints. Slot s has its own deterministic stream of raw samples (``slot_stream``: its
share of the shards, shuffled by (seed, epoch, s)) and gives ``global_batch / n_slots`` consecutive good samples
to every global batch; global batch i is the slots' contributions in slot order. Each sample's augmentation is
seeded by (seed, epoch, slot, its index in the slot's stream), not by who computes it. Ranks own contiguous
runs of slots (rank r: slots [r L, (r + 1) L), L = n_slots / world_size), so the ranks' shares, in rank order,
are the global batch, and a rank's share is cut into its micro-batches. Within a rank, loader worker w reads
the rank's slots w, w + workers, ...: every worker yields the same number of items per iteration (a slot's
contribution, or a filler where it has run out of slots) so that PyTorch's round-robin hand-out keeps the
order, and :func:`iterations` puts an iteration back together in the main process.

Positions are per slot (raw samples consumed, bad ones skipped, unreadable parts met), in a
:class:`ReaderState` indexed by slot: a resumed reader, on any number of ranks and workers, continues every
slot exactly after the last sample the trainer used.
"""

import itertools
import logging
import math
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .integrity import index_counts
from .pixels import MAX_IMAGE_PIXELS
from .reader import (
    ReadCounter,
    ReaderState,
    _collate,
    check_skips,
    cpu_rng_seeded,
    decode_sample,
    sample_seed,
    slot_stream,
)

log = logging.getLogger(__name__)


def check_slots(n_slots: int, global_batch: int, world_size: int) -> None:
    """ValueError unless ``world_size`` ranks can share ``n_slots`` slots that share a global batch equally."""
    if n_slots < 1 or global_batch % n_slots:
        raise ValueError(f'data.virtual_slots={n_slots} must divide the global batch of {global_batch} images')
    if n_slots % world_size:
        works = [w for w in range(1, n_slots + 1) if n_slots % w == 0]
        raise ValueError(
            f"the run's data stream is cut into {n_slots} virtual slots (data.virtual_slots), which "
            f'{world_size} ranks cannot share equally: it resumes on {works} ranks'
        )


def default_slots(world_size: int, num_workers: int, global_batch: int) -> int:
    """One slot per rank and loader worker, as many as divide the batch (``data.virtual_slots=0``)."""
    return world_size * math.gcd(max(num_workers, 1), global_batch // world_size)


class SlotShards(IterableDataset):
    """One rank's share of every global batch, slot by slot; use with ``DataLoader(batch_size=None,
    num_workers=num_workers)`` (non-persistent workers, so each epoch's position reaches them) and
    :func:`iterations` (or :func:`batches`).

    ``transform`` maps a uint8 CxHxW image to a list of crops (CPU multi-crop) or to a dict with 'image' and
    'size' (``canvas_resize``, for BatchedMultiCrop on the device). Items are dicts with 'crops' (list of
    (n, C, s, s)) or 'images' + 'sizes', plus 'labels', 'keys', and the slot's position fields ('slot', 'step',
    'offset', 'skipped', 'unreadable'); fillers are ``{'filler': True}``."""

    def __init__(
        self,
        urls: List[str],
        *,
        global_batch: int,
        n_slots: int,
        iterations_per_epoch: int,
        transform: Callable,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 2000,
        channels: int = 3,
        max_skip_fraction: float = 0.01,
        min_samples_before_skip_check: int = 200,
        max_pixels: Optional[int] = MAX_IMAGE_PIXELS,
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError('SlotShards needs at least one shard')
        check_slots(n_slots, global_batch, world_size)
        self.urls, self.n_slots, self.per_slot = list(urls), n_slots, global_batch // n_slots
        per_rank = n_slots // world_size
        self.slots = list(range(rank * per_rank, (rank + 1) * per_rank))
        self.iterations_per_epoch, self.num_workers = iterations_per_epoch, max(num_workers, 1)
        self.transform, self.seed, self.shuffle_buffer, self.channels = transform, seed, shuffle_buffer, channels
        self.max_skip_fraction, self.max_pixels = max_skip_fraction, max_pixels
        self.min_samples_before_skip_check = min_samples_before_skip_check
        self.expected = index_counts(self.urls)
        self.state = ReaderState()

    @property
    def turns(self) -> int:
        """Items every worker yields per iteration."""
        return math.ceil(len(self.slots) / self.num_workers)

    def set_state(self, state: ReaderState) -> None:
        if state.offsets and len(state.offsets) != self.n_slots:
            raise ValueError(f'the saved reader position has {len(state.offsets)} slots, this reader {self.n_slots}')
        self.state = ReaderState.from_dict(state.state_dict())

    def __iter__(self) -> Iterator[Dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        if nw != self.num_workers:
            raise ValueError(f'SlotShards was built for {self.num_workers} workers but runs in {nw}')
        st = self.state
        readers = [_SlotReader(self, s, st) for s in self.slots[wid::nw]]
        for step in range(st.step, self.iterations_per_epoch):
            for turn in range(self.turns):
                yield readers[turn].take(step) if turn < len(readers) else {'filler': True}


class _SlotReader:
    """One slot's stream and position within an epoch, read by one worker."""

    def __init__(self, ds: SlotShards, slot: int, st: ReaderState) -> None:
        self.ds, self.slot, self.epoch = ds, slot, st.epoch
        self.offset = st.offsets[slot] if slot < len(st.offsets) else 0
        self.skipped = st.skipped[slot] if slot < len(st.skipped) else 0
        self.counter = ReadCounter()
        stream = slot_stream(ds.urls, ds.expected, ds.seed, st.epoch, slot, ds.n_slots, ds.shuffle_buffer, self.counter)
        self.stream = itertools.islice(stream, self.offset, None)

    def take(self, step: int) -> Dict:
        ds = self.ds
        items: List[Any] = []
        labels: List[int] = []
        keys: List[str] = []
        while len(items) < ds.per_slot:
            sample = next(self.stream)
            index = self.offset
            self.offset += 1
            try:
                image, label = decode_sample(sample, ds.channels, ds.max_pixels)
                # seeded by the sample, not by who reads it: the same crops on any number of ranks and workers
                with cpu_rng_seeded(sample_seed(ds.seed, self.epoch, self.slot, index)):
                    items.append(ds.transform(image))
                labels.append(label)
                keys.append(sample['__key__'])
            except ValueError as exn:
                self.skipped += 1
                log.warning('skipping sample: %s', exn)
            check_skips(
                self.skipped + self.counter.total,
                self.offset + self.counter.lost,
                ds.max_skip_fraction,
                ds.min_samples_before_skip_check,
            )
        chunk = _collate(items)
        chunk.update(
            labels=torch.tensor(labels),
            keys=keys,
            slot=self.slot,
            step=step,
            offset=self.offset,
            skipped=self.skipped,
            unreadable=self.counter.total,
        )
        return chunk


def iterations(items: Iterator[Dict], ds: SlotShards, accum: int) -> Iterator[Dict]:
    """Whole iterations from the loader's items: {'micro': ``accum`` micro-batches, each a list of pieces (views of
    the slots' contributions, for :func:`join`), 'chunks': each slot's position fields}, the rank's slots in slot
    order. Joining waits for :func:`join` so that pinned pieces travel to the device before they are copied."""
    per_iteration = ds.turns * ds.num_workers
    while True:
        got = list(itertools.islice(items, per_iteration))
        if not got:
            return
        chunks = sorted((c for c in got if not c.get('filler')), key=lambda c: c['slot'])
        if len(chunks) != len(ds.slots):
            raise RuntimeError(f'an iteration brought {len(chunks)} slot contributions, expected {len(ds.slots)}')
        micro = len(chunks) * ds.per_slot // accum
        batches: List[List[Dict]] = [[] for _ in range(accum)]
        for i, c in enumerate(chunks):
            start = i * ds.per_slot  # the chunk's place in the rank's share, cut where micro-batches end
            while start < (i + 1) * ds.per_slot:
                m = start // micro
                end = min((m + 1) * micro, (i + 1) * ds.per_slot)
                lo, hi = start - i * ds.per_slot, end - i * ds.per_slot
                piece = {
                    k: [t[lo:hi] for t in v] if k == 'crops' else v[lo:hi]
                    for k, v in c.items()
                    if k in ('crops', 'images', 'sizes', 'labels', 'keys')
                }
                batches[m].append(piece)
                start = end
        yield {
            'micro': batches,
            'step': chunks[0]['step'],
            'chunks': [{k: c[k] for k in ('slot', 'step', 'offset', 'skipped', 'unreadable')} for c in chunks],
        }


def join(pieces: List[Dict], device: Optional[torch.device] = None) -> Dict:
    """One micro-batch from its pieces (moved to ``device`` first, asynchronously from pinned memory): a dict with
    'crops' (or 'images' + 'sizes'), 'labels' and 'keys'."""

    def cat(tensors):
        return torch.cat([t.to(device, non_blocking=True) if device is not None else t for t in tensors])

    out: Dict = {'keys': [k for p in pieces for k in p['keys']]}
    for k in pieces[0]:
        if k == 'crops':
            out[k] = [cat(views) for views in zip(*(p['crops'] for p in pieces))]
        elif k != 'keys':
            out[k] = cat([p[k] for p in pieces])
    return out


def batches(items: Iterable[Dict], ds: SlotShards, device: Optional[torch.device] = None) -> Iterator[Dict]:
    """The rank's share of every global batch as one batch (:func:`join`), for readers that neither accumulate
    gradients nor keep positions (the linear probe, benchmarks)."""
    for share in iterations(iter(items), ds, 1):
        yield join(share['micro'][0], device)

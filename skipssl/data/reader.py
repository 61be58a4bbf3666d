"""Reading WebDataset shards: the pieces of the pretraining stream (``skipssl.data.slots.SlotShards``) and the
evaluation reader (fixed order).

Pretraining stream: every slot has its own deterministic stream of raw samples (``slot_stream``): its shards
(``shards[slot::n_slots]``; with fewer shards than slots, every slot reads all shards and keeps every
n_slots-th sample), repeated as needed, shard order and shuffle buffer seeded by (seed, epoch, slot).
:class:`ReaderState` records each slot's position (raw samples consumed, samples skipped), so a resumed reader
skips exactly the samples already consumed, corrupt ones included, and continues with the unseen ones.

Both readers compare what each shard yields with the count its index records (``integrity.index_counts``):
a shard that ends early (truncated, even on a member boundary, or an index that overstates it) has its
missing samples counted as skipped, with a warning naming the shard.
"""

import hashlib
import itertools
import json
import logging
import random
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF
from webdataset import filters, tariterators

from .integrity import index_counts
from .pixels import MAX_IMAGE_PIXELS, check_pixels
from .shards import is_remote

log = logging.getLogger(__name__)

IMAGE_KEYS = ('jpg', 'jpeg', 'png', 'webp')


class TooManyBadSamples(RuntimeError):
    pass


# -- raw samples ----------------------------------------------------------------------------------------
class ReadCounter:
    """Warns about and counts what the tar layer could not read (``errors``: unreadable shard parts) and
    the samples that shards lacked against their index counts (``lost``). ``total`` counts an error in a
    shard with an index count through the samples it lost, not once more."""

    def __init__(self) -> None:
        self.errors = 0
        self.lost = 0
        self.covered = 0  # errors in shards whose losses are counted in samples

    def __call__(self, exn: Exception) -> bool:
        self.errors += 1
        log.warning('skipping unreadable shard data: %s', exn)
        return True

    def shard_short(self, url: str, got: int, expected: int, lost: int) -> None:
        self.lost += lost
        log.warning(
            'shard %s ended after %d of the %d samples its index records (truncated?): %d lost here',
            url,
            got,
            expected,
            lost,
        )

    @property
    def total(self) -> int:
        return self.errors - self.covered + self.lost


def iter_raw_samples(urls: List[str], handler: Callable[[Exception], bool]) -> Iterator[Dict]:
    """Samples (dicts of key -> bytes, with __key__ and __url__) of ``urls``, in order."""
    stream = tariterators.url_opener(({'url': u} for u in urls), handler=handler)
    files = tariterators.tar_file_expander(stream, handler=handler)
    return tariterators.group_by_keys(files, handler=handler)


def _share_of(start: int, count: int, slot: int, stride: Optional[int]) -> int:
    """How many of the stream positions [start, start + count) fall to ``slot`` when every stride-th is kept."""
    if stride is None:
        return count
    first = start + (slot - start) % stride
    return 0 if first >= start + count else (start + count - 1 - first) // stride + 1


def iter_counted(
    urls: List[str], counter: ReadCounter, expected: Dict[str, int], slot: int = 0, stride: Optional[int] = None
) -> Iterator[Dict]:
    """iter_raw_samples, shard by shard, telling ``counter`` how many samples each shard lacked against
    ``expected`` (url -> index count); with a stride, only the lost positions that fall to ``slot``."""
    position = 0
    for url in urls:
        got, errors = 0, counter.errors
        for sample in iter_raw_samples([url], counter):
            got += 1
            yield sample
        want = expected.get(url)
        if want is not None:
            counter.covered += counter.errors - errors
            lost = _share_of(position + got, max(want - got, 0), slot, stride)
            if lost:  # with a stride, the slots whose share it is say so
                counter.shard_short(url, got, want, lost)
        position += got


def first_readable_sample(urls: List[str]) -> Optional[str]:
    """The key of the first sample that the local shards of ``urls`` yield, trying them in order (a cheap
    start-up check: one sample of one good shard). ValueError naming the first shard's error when none yields
    one; None when there is no local shard to try (remote shards are read only by the run)."""
    local = [u for u in urls if not is_remote(u)]
    errors: List[Exception] = []

    def keep_going(exn: Exception) -> bool:
        errors.append(exn)
        return True

    for sample in iter_raw_samples(local, handler=keep_going):
        return sample['__key__']
    if not local:
        return None
    raise ValueError(
        f'none of the {len(local)} shard(s) holds a readable sample '
        f'({errors[0] if errors else f"{local[0]}: no samples"})'
    )


def worker_slot(rank: int, world_size: int) -> Tuple[int, int, int, int]:
    """(worker id, workers, slot, slots) of the calling data-loader worker; a slot is a (rank, worker) pair."""
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info else (0, 1)
    return wid, nw, rank * nw + wid, world_size * nw


def slot_share(urls: List[str], slot: int, n_slots: int) -> Tuple[List[str], Optional[int]]:
    """(shards a slot reads, sample stride or None): shards split by slot when there are enough,
    else all shards with every n_slots-th sample."""
    if len(urls) >= n_slots:
        return urls[slot::n_slots], None
    return urls, n_slots


def read_share(
    urls: List[str], slot: int, stride: Optional[int], counter: ReadCounter, expected: Dict[str, int]
) -> Iterator[Dict]:
    """The raw samples of a slot's share, in shard order."""
    samples = iter_counted(urls, counter, expected, slot, stride)
    return samples if stride is None else itertools.islice(samples, slot, None, stride)


def decode_sample(
    sample: Dict, channels: int = 3, max_pixels: Optional[int] = MAX_IMAGE_PIXELS
) -> Tuple[torch.Tensor, int]:
    """(uint8 CxHxW image, label) of a raw sample; raises ValueError naming shard and key when bad, an image
    whose header declares more than ``max_pixels`` pixels (``pixels.check_pixels``) included, before decoding."""
    where = f'shard {sample.get("__url__")} key {sample.get("__key__")}'
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        raise ValueError(f'{where}: no image ({"/".join(IMAGE_KEYS)}) in sample')
    try:
        check_pixels(data, max_pixels)
    except ValueError as exn:
        raise ValueError(f'{where}: {exn}') from None
    try:
        image = decode_image(
            torch.frombuffer(bytearray(data), dtype=torch.uint8),
            mode=ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY,
        )
    except Exception as exn:  # torchvision raises RuntimeError for corrupt or truncated data
        raise ValueError(f'{where}: cannot decode image: {exn}') from exn
    label = sample_label(sample)
    return image, -1 if label is None else label


def sample_label(sample: Dict) -> Optional[int]:
    """The class index a raw sample carries (``.cls``, else json ``label``); None when it carries none.
    ValueError naming shard and key for a label that is not an integer (``1e11``, ``abc``)."""
    if 'cls' in sample:
        text = bytes(sample['cls']).decode('ascii', 'replace').strip()
    elif 'json' in sample:
        try:
            value = json.loads(sample['json']).get('label')
        except (ValueError, AttributeError) as exn:
            where = f'shard {sample.get("__url__")} key {sample.get("__key__")}'
            raise ValueError(f'{where}: unreadable json ({exn})') from exn
        if value is None:
            return None
        text = value if isinstance(value, str) else repr(value)
    else:
        return None
    if not re.fullmatch(r'-?[0-9]{1,18}', text):
        raise ValueError(
            f'shard {sample.get("__url__")} key {sample.get("__key__")}: label {text[:40]!r} is not an integer'
        )
    return int(text)


# -- pretraining ----------------------------------------------------------------------------------------
@dataclass
class ReaderState:
    """The reader's position, saved with every checkpoint: epoch, steps done in it, and per virtual slot
    (``skipssl.data.slots``) the raw samples consumed, bad samples skipped and unreadable shard parts met (plus
    samples missing from shards that ended before their index count), up to the last batch the trainer used.
    (Unreadable parts and missing samples are met again when a resumed slot re-reads up to its offset, so only
    ``offsets`` and ``skipped`` are restored.)"""

    epoch: int = 0
    step: int = 0
    offsets: List[int] = field(default_factory=list)
    skipped: List[int] = field(default_factory=list)
    unreadable: List[int] = field(default_factory=list)

    def record(self, w: int, batch: Dict) -> None:
        """Slot ``w``'s position after ``batch``, which carries its position fields."""
        for values in (self.offsets, self.skipped, self.unreadable):
            values.extend([0] * (w + 1 - len(values)))
        self.offsets[w] = batch['offset']
        self.skipped[w] = batch['skipped']
        self.unreadable[w] = batch['unreadable']
        self.step = batch['step'] + 1

    def next_epoch(self) -> None:
        self.epoch, self.step, self.offsets, self.skipped, self.unreadable = self.epoch + 1, 0, [], [], []

    @property
    def total_skipped(self) -> int:
        """Bad samples, unreadable shard parts and samples missing from short shards in this epoch so far
        (reported with training metrics)."""
        return sum(self.skipped) + sum(self.unreadable)

    def state_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> 'ReaderState':
        return cls(**d)


def batch_seed(seed: int, epoch: int, rank: int, step: int) -> int:
    """A 63-bit seed for one batch of one rank, stable across runs and Python processes."""
    digest = hashlib.blake2b(f'{seed}/{epoch}/{rank}/{step}'.encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') & ((1 << 63) - 1)


def sample_seed(seed: int, epoch: int, slot: int, index: int) -> int:
    """A 63-bit seed for the augmentation of one sample: the ``index``-th of a slot's stream in an epoch."""
    digest = hashlib.blake2b(f'sample/{seed}/{epoch}/{slot}/{index}'.encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') & ((1 << 63) - 1)


@contextmanager
def cpu_rng_seeded(seed: int) -> Iterator[None]:
    """Torch's CPU generator seeded with ``seed`` inside, restored after: the draws ``torch.manual_seed(seed)``
    would give, at a fiftieth of its cost. ``torch.manual_seed`` also queues the seed for CUDA, XPU and MTIA,
    each formatting a stack trace (85 us a call here), which per sample was a third of the demo's data time."""
    state = torch.default_generator.get_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.default_generator.set_state(state)


def slot_stream(
    urls: List[str],
    expected: Dict[str, int],
    seed: int,
    epoch: int,
    slot: int,
    n_slots: int,
    shuffle_buffer: int,
    counter: ReadCounter,
) -> Iterator[Dict]:
    """A slot's endless, deterministic stream of raw samples for an epoch: its share of the shards
    (``slot_share``), repeated as needed, shard order and shuffle buffer seeded by (seed, epoch, slot); what
    could not be read, or is missing from short shards (``expected``: index counts), is counted in ``counter``."""
    rng = random.Random(f'{seed}/{epoch}/{slot}')
    share, stride = slot_share(urls, slot, n_slots)

    def cycles():
        for _ in itertools.count():
            order = list(share)
            if stride is None:
                rng.shuffle(order)
            empty = True
            for s in read_share(order, slot, stride, counter, expected):
                empty = False
                yield s
            if empty:
                raise TooManyBadSamples(f'no readable samples in shards {share[:3]}{"..." if len(share) > 3 else ""}')

    # fill the whole buffer before the first sample: a partly filled one shuffles the start poorly
    return filters.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=rng)(cycles())


def canvas_resize(size: int) -> Callable[[torch.Tensor], Dict]:
    """For the device-side augmentation: resize to a common ``size`` x ``size`` uint8 canvas, keep the
    original (h, w) so crop boxes are drawn in the original geometry."""

    def fn(image: torch.Tensor) -> Dict:
        h, w = image.shape[-2:]
        return {'image': TF.resize(image, [size, size], antialias=True), 'size': torch.tensor([h, w])}

    return fn


def check_skips(bad: int, seen: int, max_fraction: float, min_seen: int) -> None:
    """TooManyBadSamples once more than ``max_fraction`` of the ``seen`` samples (at least ``min_seen``) were bad."""
    if seen >= min_seen and bad > max_fraction * seen:
        raise TooManyBadSamples(
            f'{bad} of {seen} samples were unreadable or missing (more than max_skip_fraction='
            f'{max_fraction}); check the shards (warnings above name them)'
        )


def _collate(items: List) -> Dict:
    if isinstance(items[0], dict):
        return {'images': torch.stack([i['image'] for i in items]), 'sizes': torch.stack([i['size'] for i in items])}
    return {'crops': [torch.stack(c) for c in zip(*items)]}


# -- evaluation -----------------------------------------------------------------------------------------
class EvalShards(IterableDataset):
    """Labelled samples in a fixed order, no augmentation: yields (image, label, key).

    Each (rank, worker) slot reads a disjoint part: whole shards when there are at least as many shards as
    slots, else every n-th sample; sort by key after gathering for a fixed global order. With
    ``require_labels``, a sample without a label, or with one outside [0, ``num_classes``), stops the reader
    with a ValueError naming shard and key (``label_bound`` says where the bound comes from).
    """

    def __init__(
        self,
        urls: List[str],
        transform: Optional[Callable] = None,
        rank: int = 0,
        world_size: int = 1,
        channels: int = 3,
        require_labels: bool = True,
        num_classes: Optional[int] = None,
        label_bound: str = 'classes',
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError('EvalShards needs at least one shard')
        self.urls, self.transform, self.rank, self.world_size = list(urls), transform, rank, world_size
        self.channels, self.require_labels = channels, require_labels
        self.num_classes, self.label_bound = num_classes, label_bound
        self.expected = index_counts(self.urls)
        self.skipped = 0

    def __iter__(self):
        _, _, slot, n_slots = worker_slot(self.rank, self.world_size)
        urls, stride = slot_share(self.urls, slot, n_slots)
        for sample in read_share(urls, slot, stride, ReadCounter(), self.expected):
            if self.require_labels:  # before decoding: a label error stops the reader, it is not a bad image
                self.check_label(sample)
            try:
                image, label = decode_sample(sample, self.channels)
            except ValueError as exn:
                self.skipped += 1
                log.warning('skipping sample: %s', exn)
                continue
            yield (self.transform(image) if self.transform else image), label, sample['__key__']

    def check_label(self, sample: Dict) -> None:
        where = f'shard {sample["__url__"]} key {sample["__key__"]}'
        label = sample_label(sample)
        if label is None:
            raise ValueError(f"{where} has no label (.cls or json 'label'); evaluation needs labelled shards")
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            bound = f'0..{self.num_classes - 1}' if self.num_classes is not None else '0 or more'
            raise ValueError(f'{where}: label {label} is not a class index ({bound}: {self.label_bound})')


def eval_transform(
    resize: int = 256, crop: int = 224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
) -> Callable[[torch.Tensor], torch.Tensor]:
    """DINO's evaluation preprocessing: resize the shorter side, centre crop, normalise."""
    from torchvision.transforms import InterpolationMode, v2

    return v2.Compose(
        [
            v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(crop),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )

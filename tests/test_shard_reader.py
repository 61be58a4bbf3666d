"""WebDataset readers: round trip, rank/worker split, slot streams, fixed-length epochs on uneven shards, exact resume
with corrupt samples, bad input (the pretraining reader is ``SlotShards``; ``test_elastic_resume`` covers changing
ranks and workers)."""

import io
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from skipssl.data import (
    EvalShards,
    ReaderState,
    SlotShards,
    TooManyBadSamples,
    canvas_resize,
    decode_sample,
    resolve_shards,
)
from skipssl.data.integrity import index_counts
from skipssl.data.reader import ReadCounter, cpu_rng_seeded, slot_share, slot_stream
from skipssl.data.slots import iterations, join
from skipssl_common.artefacts import SHARD_INDEX_FORMAT


def png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format='PNG')
    return buf.getvalue()


def image_for(i, size=8):
    """A deterministic image whose pixels encode its index."""
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (size, size + i % 3, 3), dtype=np.uint8)


def write_shards(folder, counts, corrupt=(), missing_image=(), prefix='train'):
    """Shards written with webdataset's own TarWriter; samples 0..N-1 across shards of the given sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    i, names = 0, []
    for s, n in enumerate(counts):
        name = f'{prefix}-{s:06d}.tar'
        with wds.TarWriter(str(folder / name)) as w:
            for _ in range(n):
                sample = {'__key__': f'sample{i:05d}', 'cls': str(i % 7)}
                if i not in missing_image:
                    sample['png'] = b'not an image at all' if i in corrupt else png_bytes(image_for(i))
                w.write(sample)
                i += 1
        names.append(name)
    index = {
        'format': SHARD_INDEX_FORMAT,
        'prefix': prefix,
        'num_samples': i,
        'shards': [{'name': n, 'num_samples': c} for n, c in zip(names, counts)],
    }
    (folder / f'{prefix}-index.json').write_text(json.dumps(index))
    return [str(folder / n) for n in names]


def key_index(key):
    return int(key.replace('sample', ''))


def keys_transform(image):
    return {'image': image[:, :1, :1].clone(), 'size': torch.tensor(image.shape[-2:])}


def slot_shards(urls, global_batch, n_slots, iterations_per_epoch, **kw):
    return SlotShards(
        urls,
        global_batch=global_batch,
        n_slots=n_slots,
        iterations_per_epoch=iterations_per_epoch,
        transform=kw.pop('transform', keys_transform),
        **kw,
    )


def run_epoch(ds, num_workers):
    """The rest of the epoch, one (joined batch, slots' position fields) per iteration."""
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers)
    return [(join(it['micro'][0]), it['chunks']) for it in iterations(iter(loader), ds, 1)]


def positions(epoch, state=None):
    """``state`` (a new one by default) after the iterations of ``run_epoch``."""
    state = state or ReaderState()
    for _, chunks in epoch:
        for c in chunks:
            state.record(c['slot'], c)
    return state


def test_round_trip_pixels_and_labels(tmp_path):
    urls = write_shards(tmp_path, [5, 4, 3])
    seen = {}
    for image, label, key in EvalShards(urls):
        seen[key] = (image, label)
    assert len(seen) == 12
    for key, (image, label) in seen.items():
        i = key_index(key)
        assert torch.equal(image, torch.from_numpy(image_for(i)).permute(2, 0, 1))
        assert label == i % 7
    assert resolve_shards(str(tmp_path)) == urls
    assert resolve_shards(str(tmp_path / 'train-index.json')) == urls
    assert resolve_shards(str(tmp_path / 'train-{000000..000002}.tar')) == urls


@pytest.mark.parametrize('world', [1, 2, 3])
def test_eval_split_is_disjoint_and_complete(tmp_path, world):
    for counts in ([4, 3, 5, 2, 6, 1, 3], [10]):  # more shards than slots, and fewer
        urls = write_shards(tmp_path / f'{len(counts)}', counts)
        per_rank = []
        for rank in range(world):
            loader = DataLoader(EvalShards(urls, rank=rank, world_size=world), batch_size=None, num_workers=2)
            per_rank.append([key for _, _, key in loader])
        all_keys = [k for keys in per_rank for k in keys]
        assert len(all_keys) == len(set(all_keys)) == sum(counts)


@pytest.mark.parametrize('n_slots', [2, 4, 6])
def test_slot_streams_are_disjoint_and_cover_the_data_in_one_pass(tmp_path, n_slots):
    """Each slot's first pass is a disjoint part of the data; together they cover it."""
    for counts in ([4, 3, 5, 2, 6, 1, 3], [9, 8]):
        urls = write_shards(tmp_path / f'{len(counts)}', counts)
        total = sum(counts)
        slots = []
        for slot in range(n_slots):
            shard_urls, stride = slot_share(urls, slot, n_slots)
            n = (
                sum(counts[u] for u in range(len(counts)) if urls[u] in shard_urls)
                if stride is None
                else len(range(slot, total, stride))
            )
            stream = slot_stream(urls, index_counts(urls), 0, 0, slot, n_slots, 0, ReadCounter())
            slots.append([next(stream)['__key__'] for _ in range(n)])
        keys = [k for s in slots for k in s]
        assert sorted(keys) == sorted(f'sample{i:05d}' for i in range(total))


def test_every_rank_runs_the_same_number_of_full_iterations_with_uneven_shards(tmp_path):
    urls = write_shards(tmp_path, [11, 2, 7, 1, 5])  # 26 samples, very uneven
    steps = []
    for rank in range(3):
        ds = slot_shards(urls, 12, 6, 26 // 12, rank=rank, world_size=3, num_workers=2, shuffle_buffer=8)
        epoch = run_epoch(ds, 2)
        assert all(b['images'].shape[0] == 4 for b, _ in epoch)
        assert [chunks[0]['step'] for _, chunks in epoch] == list(range(len(epoch)))
        steps.append(len(epoch))
    assert steps == [26 // 12] * 3


def test_resume_mid_epoch_yields_exactly_the_unseen_samples(tmp_path):
    urls = write_shards(tmp_path, [9, 8, 7, 6], corrupt={5, 17})

    def make(workers=2):  # 3 slots over 2 workers: one worker hands out a filler every iteration
        return slot_shards(urls, 6, 3, 5, num_workers=workers, seed=3, shuffle_buffer=6, max_skip_fraction=0.5)

    def skipped(epoch):
        return [[c['skipped'] for c in chunks] for _, chunks in epoch]

    full = run_epoch(make(), 2)
    assert len(full) == 5
    assert skipped(full)[-1] != [0, 0, 0]  # the corrupt samples were met (and skipped)
    state = positions(full[:2])
    for workers in (2, 0):
        resumed_ds = make(workers)
        resumed_ds.set_state(ReaderState.from_dict(json.loads(json.dumps(state.state_dict()))))
        resumed = run_epoch(resumed_ds, workers)
        assert [chunks[0]['step'] for _, chunks in resumed] == list(range(2, 5))
        assert [b['keys'] for b, _ in resumed] == [b['keys'] for b, _ in full[2:]]
        assert skipped(resumed) == skipped(full[2:])
    # a new epoch reshuffles
    state.next_epoch()
    nxt = make()
    nxt.set_state(state)
    assert [b['keys'] for b, _ in run_epoch(nxt, 2)] != [b['keys'] for b, _ in full]
    with pytest.raises(ValueError, match='has 2 slots, this reader 3'):
        make().set_state(ReaderState(offsets=[1, 2], skipped=[0, 0], unreadable=[0, 0]))


def test_corrupt_and_missing_images_and_truncated_shard_are_skipped_and_counted(tmp_path, caplog):
    urls = write_shards(tmp_path, [6, 6, 6], corrupt={2}, missing_image={8})
    with open(urls[2], 'r+b') as f:  # truncate the last shard mid-way
        f.truncate(os.path.getsize(urls[2]) // 2)
    ds = slot_shards(urls, 2, 1, 8, shuffle_buffer=0, max_skip_fraction=0.5, min_samples_before_skip_check=1000)
    state = positions(run_epoch(ds, 0))
    assert state.skipped[0] >= 2  # the corrupt and the image-less sample (again when cycling)
    assert state.unreadable[0] >= 1  # the truncated shard
    assert state.total_skipped >= 3
    text = caplog.text
    assert 'sample00002' in text and 'sample00008' in text and urls[0] in text
    evaluated = [key for _, _, key in EvalShards(urls)]
    assert 'sample00002' not in evaluated and 'sample00000' in evaluated


def test_too_many_bad_samples_stop_the_run(tmp_path):
    urls = write_shards(tmp_path, [20], corrupt=set(range(0, 20, 2)))
    ds = slot_shards(urls, 2, 1, 4, shuffle_buffer=0, max_skip_fraction=0.1, min_samples_before_skip_check=5)
    with pytest.raises(TooManyBadSamples, match='max_skip_fraction'):
        run_epoch(ds, 0)


def test_missing_or_empty_shards_fail_at_startup(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere'):
        resolve_shards(str(tmp_path / 'nowhere'))
    with pytest.raises(FileNotFoundError, match='no shards'):
        resolve_shards(str(tmp_path))
    (tmp_path / 'empty-000000.tar').write_bytes(b'')
    with pytest.raises(ValueError, match='empty-000000.tar is empty'):
        resolve_shards(str(tmp_path))
    write_shards(tmp_path / 'some', [2])
    with pytest.raises(FileNotFoundError, match='train-000001.tar does not exist'):
        resolve_shards(str(tmp_path / 'some' / 'train-{000000..000001}.tar'))
    with pytest.raises(ValueError, match='needs at least one shard'):
        slot_shards([], 8, 2, 1)
    with pytest.raises(ValueError, match='virtual_slots=3 must divide the global batch of 8 images'):
        slot_shards(['x.tar'], 8, 3, 1)


def test_eval_requires_labels(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    with wds.TarWriter(str(tmp_path / 'u-000000.tar')) as w:
        w.write({'__key__': 'a', 'png': png_bytes(image_for(0))})
    with pytest.raises(ValueError, match='no label'):
        list(EvalShards([str(tmp_path / 'u-000000.tar')]))


def test_device_path_batches_raw_images_on_a_canvas(tmp_path):
    urls = write_shards(tmp_path, [8])
    ds = slot_shards(urls, 4, 1, 2, transform=canvas_resize(16), shuffle_buffer=0)
    batches = [b for b, _ in run_epoch(ds, 0)]
    assert batches[0]['images'].shape == (4, 3, 16, 16) and batches[0]['images'].dtype == torch.uint8
    assert Counter(tuple(s.tolist()) for b in batches for s in b['sizes']) == Counter(
        tuple(image_for(i).shape[:2]) for i in range(8)
    )


def test_decode_sample_reads_labels_from_json_too():
    sample = {'__key__': 'k', '__url__': 'u', 'png': png_bytes(image_for(1)), 'json': b'{"label": 4}'}
    image, label = decode_sample(sample)
    assert label == 4 and image.shape == (3, 8, 9)
    gray, _ = decode_sample(sample, channels=1)
    assert gray.shape == (1, 8, 9)


def test_pipe_urls_are_read_through_webdataset(tmp_path):
    urls = write_shards(tmp_path, [3, 2])
    piped = resolve_shards([f'pipe:cat {u}' for u in urls], allow_pipe=True)
    assert piped == [f'pipe:cat {u}' for u in urls]
    assert sorted(key for _, _, key in EvalShards(piped)) == [f'sample{i:05d}' for i in range(5)]


def test_cpu_rng_seeded_draws_what_manual_seed_draws_and_restores_the_generator():
    """The per-sample augmentation seed: inside, the draws of ``torch.manual_seed(seed)``; after, the caller's
    stream continues as if nothing had been drawn."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(7)
    caller = torch.rand(3)
    torch.manual_seed(7)
    with cpu_rng_seeded(123):
        inside = torch.rand(4)
    assert torch.equal(inside, expected)
    assert torch.equal(torch.rand(3), caller)
    torch.manual_seed(7)
    torch.rand(3)
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError, match='augmentation failed'):  # restored on the error path too
        with cpu_rng_seeded(5):
            torch.rand(1)
            raise RuntimeError('augmentation failed')
    assert torch.equal(torch.get_rng_state(), state)

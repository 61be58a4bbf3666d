"""Images per second of the data path: shard reading + JPEG decoding + DINO multi-crop, per CPU core, and
the device-side (batched) augmentation's rate.

The CPU multi-crop is compared, in one run with the repeats interleaved, against DINO's own recipe
(``bench.dino_recipe``: torchvision's classic transforms on PIL images) and torchvision's v2 ops crop by crop
(``TorchvisionMultiCrop``, the project's transform before this one), each from JPEG bytes through decoding to
normalised crops; the JSON records each rate and the ratios to DINO's.

    python -m bench.data_throughput                      # 2x224 + 10x96 crops from ImageNet-size JPEGs
    python -m bench.data_throughput --shards 'data/imagenet/train-{000000..000010}.tar'

Without ``--shards`` it writes a shard of synthetic ImageNet-size JPEGs (500x375, quality 90: the decoder
does the same work as on photos of that size). The CPU figure is one process with one torch thread, i.e.
per core; a node's loader scales it by its worker count.
"""

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from bench.backbone_throughput import RESULTS_DIR, device_name, pick_device
from bench.dino_recipe import DinoRecipe
from skipssl.data import (
    BatchedMultiCrop,
    MultiCropConfig,
    MultiCropTransform,
    SlotShards,
    TorchvisionMultiCrop,
    canvas_resize,
    decode_sample,
    resolve_shards,
)
from skipssl.data.slots import batches
from skipssl.models.throughput import synchronize


def synthetic_jpegs(n: int, size=(500, 375), quality: int = 90) -> List[bytes]:
    """n JPEGs of smooth colour fields plus noise: ImageNet-size work for the decoder."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        low = rng.random((12, 16, 3))
        img = Image.fromarray((low * 255).astype(np.uint8)).resize(size, Image.BICUBIC)
        noise = rng.normal(0, 12, (size[1], size[0], 3))
        img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format='JPEG', quality=quality)
        out.append(buf.getvalue())
    return out


def synthetic_jpeg_shard(folder: Path, n: int, size=(500, 375), quality: int = 90) -> str:
    path = folder / 'synthetic-000000.tar'
    with wds.TarWriter(str(path)) as w:
        for i, jpeg in enumerate(synthetic_jpegs(n, size, quality)):
            w.write({'__key__': f'img{i:06d}', 'jpg': jpeg, 'cls': str(i % 10)})
    return str(path)


def crop_pipelines(cfg: MultiCropConfig) -> Dict[str, Callable[[bytes], List[torch.Tensor]]]:
    """JPEG bytes -> normalised crops: DINO's recipe (the baseline, first), the project's before and now."""

    def reader(transform):
        return lambda data: transform(decode_sample({'jpg': data})[0])

    return {
        'dino_recipe': DinoRecipe(cfg),
        'torchvision_v2': reader(TorchvisionMultiCrop(cfg)),
        'multicrop': reader(MultiCropTransform(cfg)),
    }


def crop_rates(jpegs: List[bytes], cfg: MultiCropConfig, repeats: int) -> Dict:
    """Images/s of each pipeline on ``jpegs`` and each one's ratio to the first, repeats interleaved (a loaded
    machine slows all alike); medians over repeats, the ratio taken within each repeat."""
    pipelines = crop_pipelines(cfg)
    for run in pipelines.values():
        run(jpegs[0])
    rates: Dict[str, List[float]] = {name: [] for name in pipelines}
    load = [os.getloadavg()[0]]
    for _ in range(repeats):
        for name, run in pipelines.items():
            t0 = time.perf_counter()
            for data in jpegs:
                run(data)
            rates[name].append(len(jpegs) / (time.perf_counter() - t0))
        load.append(os.getloadavg()[0])
    base = next(iter(rates.values()))
    return {
        'img_per_s': {name: statistics.median(r) for name, r in rates.items()},
        'ratio_to_dino': {name: statistics.median(a / b for a, b in zip(r, base)) for name, r in rates.items()},
        'img_per_s_each_repeat': rates,
        'loadavg_1min': load,
    }


def cpu_rate(urls, n_images: int, transform, batch: int = 16) -> float:
    """Images/s of the training reader (one slot, in this process) with ``transform``, batches joined."""
    ds = SlotShards(
        urls,
        global_batch=batch,
        n_slots=1,
        iterations_per_epoch=n_images // batch,
        transform=transform,
        shuffle_buffer=0,
    )
    it = batches(ds, ds)
    next(it)  # warm-up: first shard open, first decodes
    t0 = time.perf_counter()
    count = 0
    for batch in it:
        count += batch['labels'].shape[0]
    return count / (time.perf_counter() - t0)


def device_rate(cfg, device, batch_size: int, canvas: int, repeats: int) -> float:
    aug = BatchedMultiCrop(cfg)
    images = torch.randint(0, 256, (batch_size, 3, canvas, canvas), dtype=torch.uint8, device=device)
    aug(images)
    rates = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        aug(images)
        synchronize(device)
        rates.append(batch_size / (time.perf_counter() - t0))
    return statistics.median(rates)


def decode_rate(jpegs: List[bytes], device: torch.device, batch_size: int, repeats: int) -> float:
    """Images/s of torchvision's decode_jpeg on ``device`` (nvJPEG on CUDA, batched), JPEG bytes already in
    memory: the decoder alone, median of ``repeats`` batches."""
    from torchvision.io import decode_jpeg

    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs[:batch_size]]
    decode_jpeg(data, device=device)
    rates = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        decode_jpeg(data, device=device)
        synchronize(device)
        rates.append(len(data) / (time.perf_counter() - t0))
    return statistics.median(rates)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--shards', default=None, help='real shards to read (default: a synthetic JPEG shard)')
    p.add_argument('--images', type=int, default=256, help='images timed on the CPU path')
    p.add_argument('--n-local', type=int, default=10)
    p.add_argument('--compare-images', type=int, default=48, help='JPEGs per repeat of the DINO comparison')
    p.add_argument('--repeats', type=int, default=5, help='interleaved repeats of the DINO comparison')
    p.add_argument('--canvas', type=int, default=256, help='canvas size handed to the device path')
    p.add_argument('--device', default='auto')
    p.add_argument('--device-batch', type=int, default=None, help='default: 256 on CUDA, 32 on CPU')
    p.add_argument('--out', type=Path, default=None)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    cfg = MultiCropConfig(n_local=args.n_local)
    device = pick_device(args.device)
    compare = crop_rates(synthetic_jpegs(args.compare_images), cfg, args.repeats)
    for name, rate in compare['img_per_s'].items():
        print(f"{name:>15}: {rate:6.1f} img/s per core, {compare['ratio_to_dino'][name]:.2f}x DINO's recipe")
    with tempfile.TemporaryDirectory() as tmp:
        urls = resolve_shards(args.shards) if args.shards else [synthetic_jpeg_shard(Path(tmp), args.images + 16)]
        cpu = cpu_rate(urls, args.images, MultiCropTransform(cfg))
        decode_only = cpu_rate(urls, args.images, canvas_resize(args.canvas))
    print(
        f'CPU path (1 core): {cpu:.1f} img/s decoded + {cfg.n_global}x{cfg.global_size} + '
        f'{cfg.n_local}x{cfg.local_size} crops; decode + {args.canvas}px canvas only: {decode_only:.1f} img/s'
    )

    if device.type == 'cuda':
        torch.set_num_threads(os.cpu_count() or 1)
    batch = args.device_batch or (256 if device.type == 'cuda' else 32)
    dev = device_rate(cfg, device, batch, args.canvas, repeats=5 if device.type == 'cuda' else 2)
    print(f'device path on {device_name(device)}: {dev:.1f} img/s (batch {batch}, canvas {args.canvas})')

    report = {
        'benchmark': 'data_throughput',
        'date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'cpu': device_name(torch.device('cpu')),
        'shards': args.shards or 'synthetic 500x375 JPEG q90',
        'crops': f'{cfg.n_global}x{cfg.global_size} + {cfg.n_local}x{cfg.local_size}',
        'cpu_cores': os.cpu_count(),
        'cpu_img_per_s_per_core': cpu,
        'cpu_vs_dino_recipe': {'images_per_repeat': args.compare_images, 'repeats': args.repeats, **compare},
        'cpu_decode_canvas_img_per_s_per_core': decode_only,
        'device': device_name(device),
        'device_batch': batch,
        'device_img_per_s': dev,
    }
    out = args.out or RESULTS_DIR / f'data_throughput_{device.type}.json'
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + '\n')
    print(f'wrote {out}')
    return report


if __name__ == '__main__':
    main()

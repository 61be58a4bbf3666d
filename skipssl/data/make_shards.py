"""Write an image collection as shuffled WebDataset tar shards, in parallel, atomically and resumably.

Usage::

    # ImageNet train/ as-is (original JPEG bytes), 10,000 images or 1 GiB per shard at most
    python -m skipssl.data.make_shards --source imagefolder --root /data/imagenet/train \\
        --out-dir /data/shards/imagenet --prefix train
    # re-encoded to JPEG quality 90 with the shorter side resized to 256
    python -m skipssl.data.make_shards --source imagefolder --root /data/imagenet/val \\
        --out-dir /data/shards/imagenet-256 --reencode jpeg --resize-shorter 256
    # Fashion-MNIST (always PNG, 8-bit grayscale)
    python -m skipssl.data.make_shards --source fashion-mnist --root /usr/share/datasets/fashion-mnist \\
        --split test --out-dir /data/shards/fmnist

    from skipssl.data.make_shards import write_shards
    from skipssl.data.sources import ImageFolderSource
    index = write_shards(ImageFolderSource('/data/imagenet/val'), '/data/shards/imagenet', 'val', workers=8)

Output in out_dir: `{prefix}-000000.tar`, ... and, once every shard is written, `{prefix}-index.json`:
{"format": "skipssl-shards/1", "prefix", "split", "source", "num_samples", "num_classes", "classes" (names
in class-index order), "shards": [{"name" (relative to the index's folder), "num_samples", "num_bytes",
"sha256"}],
"seed", "image_format": "as-is" | "jpeg" | "png"}. A sample is the tar members `{key}.jpg` or
`{key}.png` (named by the bytes, whatever the file's extension), `{key}.cls` (class index, ASCII decimal)
and `{key}.json` ({"label", "class_name", "source"}). Samples follow one global permutation (numpy
default_rng(seed)), cut into shards in that order by --max-samples and --max-bytes. Tar headers carry a
fixed time (0) and owner, so the same inputs and parameters give byte-identical shards.

--max-bytes bounds each shard's file size (tar headers, padding and end blocks included), and the plan
must be fixed before the parallel writers start. As-is, every sample's tar size is exact from the file
sizes on disk. Re-encoded (and Fashion-MNIST) images have no size before encoding, so the planning pass
encodes every image once, in the worker pool, to measure it, and the writers encode again: exact and
deterministic (the encoders are), at twice the encoding work. `--max-bytes 0` drops the byte bound and
plans by sample count alone, with no measuring pass.

Resume: `{prefix}-plan.json` records the plan's parameters, its cut (samples per shard, so a resumed
re-encoding run skips the measuring pass) and each finished shard (samples, bytes, sha256). A re-run with
the same parameters keeps every finished shard whose file still has its recorded size and writes the
rest; with other parameters it refuses to touch an out_dir that holds shards unless --overwrite. Shards
are written to hidden temporary files and os.replace()d into place; the index is written last.
"""

import argparse
import io
import json
import multiprocessing
import os
import re
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from skipssl_common.artefacts import SHARD_INDEX_FORMAT
from skipssl_common.io import atomic_open, atomic_write_json, sha256

from .pixels import MAX_IMAGE_PIXELS, check_pixels
from .sources import FASHION_MNIST_ROOT, SOURCES, ImageFolderSource, PathLike, Source, open_source, pil_rgb

DEFAULT_MAX_SAMPLES = 10_000
DEFAULT_MAX_BYTES = 1 << 30
_PREFIX = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.-]*')
_AS_IS_SUFFIXES = ('.jpg', '.jpeg', '.png')  # the reader's contract has .jpg and .png image members only
_JPEG_MAGIC, _PNG_MAGIC = b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n'


# ----------------------------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class Encoding:
    image_format: str  # 'as-is', 'jpeg' or 'png'
    quality: int = 90  # JPEG only
    resize_shorter: Optional[int] = None  # shorter side in pixels, re-encoding only
    # images whose header declares more are refused before decoding (0: no limit); not a plan parameter: it
    # changes no shard that gets written
    max_pixels: int = MAX_IMAGE_PIXELS


def encode_image(source: Source, index: int, encoding: Encoding) -> Tuple[str, bytes]:
    """(tar extension, bytes) of one image; any failure is re-raised as ValueError naming the image."""
    try:
        if not isinstance(source, ImageFolderSource):  # Fashion-MNIST: 28 x 28 arrays, not files
            return _reencode(source.load_image(index), encoding)
        data = source.read_bytes(index)
        check_pixels(data, encoding.max_pixels)
        if encoding.image_format == 'as-is':
            return _sniff_extension(data), data
        return _reencode(pil_rgb(data), encoding)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f'cannot store image {source.location(index)}: {err}') from err


def _sniff_extension(data: bytes) -> str:
    # By content, not file name: ImageNet's train set has a PNG named .JPEG, which must go in as .png.
    if data.startswith(_JPEG_MAGIC):
        return 'jpg'
    if data.startswith(_PNG_MAGIC):
        return 'png'
    raise ValueError('neither JPEG nor PNG data; store it with --reencode jpeg|png')


def _reencode(image: Image.Image, encoding: Encoding) -> Tuple[str, bytes]:
    if encoding.resize_shorter:
        image = image.resize(_shorter_side_size(image.size, encoding.resize_shorter), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    if encoding.image_format == 'jpeg':
        image.save(buffer, format='JPEG', quality=encoding.quality)
        return 'jpg', buffer.getvalue()
    image.save(buffer, format='PNG')
    return 'png', buffer.getvalue()


def _shorter_side_size(size: Tuple[int, int], shorter: int) -> Tuple[int, int]:
    """(width, height) with the shorter side `shorter`, aspect kept (truncating, as torchvision's Resize)."""
    w, h = size
    return (shorter, max(1, int(shorter * h / w))) if w <= h else (max(1, int(shorter * w / h)), shorter)


def _metadata(source: Source, index: int) -> Dict[str, bytes]:
    """The sample's .cls and .json members (everything but the image)."""
    sample = source.samples[index]
    meta = {'label': sample.label, 'class_name': source.classes[sample.label], 'source': sample.source}
    return {'cls': str(sample.label).encode('ascii'), 'json': json.dumps(meta, ensure_ascii=False).encode('utf-8')}


# ------------------------------------------------------------------------------------------------ planning


def _member_bytes(size: int) -> int:
    """A tar member's bytes: one 512-byte header, the data padded to 512-byte blocks."""
    return tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _archive_bytes(members: int) -> int:
    """A tar file's bytes around `members` bytes of members: two zero end blocks, padded to a 10 KiB record."""
    return -(-(members + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _sample_bytes(source: Source, index: int, image_size: int) -> int:
    return _member_bytes(image_size) + sum(_member_bytes(len(v)) for v in _metadata(source, index).values())


def _measure_image(source: Source, index: int, encoding: Encoding) -> Tuple[int, int]:
    return index, len(encode_image(source, index, encoding)[1])


def plan_shards(
    order: Iterable[int],
    max_samples: int,
    sizes: Optional[Sequence[int]] = None,
    max_bytes: Optional[int] = None,
    locate: Callable[[int], str] = str,
) -> List[List[int]]:
    """Cut `order` greedily into shards of at most max_samples samples and max_bytes file bytes.

    sizes[i]: sample i's tar bytes; needed only with max_bytes. locate(i) names sample i in errors.
    """
    if max_bytes and sizes is None:
        raise ValueError('plan_shards: max_bytes needs the sizes of the samples')
    shards: List[List[int]] = []
    current: List[int] = []
    members = 0
    for i in map(int, order):
        size = sizes[i] if max_bytes and sizes is not None else 0
        if max_bytes and _archive_bytes(size) > max_bytes:
            raise ValueError(
                f'{locate(i)} needs a {_archive_bytes(size)}-byte shard on its own, more than --max-bytes {max_bytes}'
            )
        if current and (len(current) == max_samples or (max_bytes and _archive_bytes(members + size) > max_bytes)):
            shards.append(current)
            current, members = [], 0
        current.append(i)
        members += size
    return shards + [current] if current else shards


# ----------------------------------------------------------------------------------------- worker processes

_worker_source: Optional[Source] = None


def _init_worker(source: Source) -> None:
    global _worker_source
    _worker_source = source


def _call_in_worker(job: Tuple[Callable, tuple]) -> Any:
    fn, args = job
    return fn(_worker_source, *args)


class _Runner:
    """Runs fn(source, *args) for many args: in a pool whose workers get the source once, or in-process."""

    def __init__(self, source: Source, workers: int):
        self.source = source
        self.pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=(source,)) if workers > 1 else None

    def imap_unordered(self, fn: Callable, arg_tuples: Iterable[tuple], chunksize: int = 1) -> Iterator[Any]:
        if self.pool is None:
            return (fn(self.source, *args) for args in arg_tuples)
        return self.pool.imap_unordered(_call_in_worker, ((fn, args) for args in arg_tuples), chunksize)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


@dataclass(frozen=True)
class ShardTask:
    path: str  # final shard path
    indices: Tuple[int, ...]  # samples, in shard order
    encoding: Encoding
    max_bytes: Optional[int]


def _write_shard(source: Source, task: ShardTask) -> Dict[str, Any]:
    """Write one shard atomically: it lands only when complete and within --max-bytes."""
    path = Path(task.path)
    with atomic_open(path, 'wb') as f:
        # mtime 0 and fixed owner: re-running writes byte-identical shards.
        with wds.TarWriter(f, encoder=False, mtime=0, format='USTAR_FORMAT') as writer:
            for i in task.indices:
                ext, image = encode_image(source, i, task.encoding)
                writer.write({'__key__': source.samples[i].key, ext: image, **_metadata(source, i)})
        size = f.tell()
        if task.max_bytes and size > task.max_bytes:  # the plan's exact sizes make this a bug, not bad input
            raise RuntimeError(f'{path.name}: {size} bytes, more than --max-bytes {task.max_bytes}')
    return {'name': path.name, 'num_samples': len(task.indices), 'num_bytes': size, 'sha256': sha256(path)}


# ------------------------------------------------------------------------------------------- out_dir state


def _shard_name(prefix: str, number: int) -> str:
    return f'{prefix}-{number:06d}.tar'


def _plan_path(out_dir: Path, prefix: str) -> Path:
    return out_dir / f'{prefix}-plan.json'


def _index_path(out_dir: Path, prefix: str) -> Path:
    return out_dir / f'{prefix}-index.json'


def _own_files(out_dir: Path, prefix: str) -> List[Path]:
    """Shards, plan, index and leftover temporaries of this prefix: what --overwrite may delete."""
    # temporaries: '.{name}.tmp{pid}' (skipssl_common.io's atomic writes), '.{name}.{pid}.tmp' (older writers)
    names = re.compile(rf'\.?{re.escape(prefix)}-(\d{{6,}}\.tar|plan\.json|index\.json)(\.\d+\.tmp|\.tmp\d+)?')
    return sorted(p for p in out_dir.iterdir() if names.fullmatch(p.name))


def _remove_temporaries(out_dir: Path, prefix: str) -> None:
    """Delete the temporary files of killed writers (a terminated pool worker cannot clean up)."""
    for path in _own_files(out_dir, prefix):
        if '.tmp' in path.name:
            path.unlink(missing_ok=True)


def _previous_plan(out_dir: Path, prefix: str, params: Dict[str, Any], overwrite: bool) -> Dict[str, Any]:
    """The plan file of an earlier run with these params, or {}; refuse to mix with shards made otherwise."""
    _remove_temporaries(out_dir, prefix)
    recorded = _read_plan(_plan_path(out_dir, prefix))
    if recorded is not None and recorded.get('params') == params:
        return recorded
    own = _own_files(out_dir, prefix)
    if not any(p.name.endswith('.tar') for p in own):
        return {}
    if not overwrite:
        how = _params_diff(recorded.get('params', {}), params) if recorded else 'without a readable plan file'
        raise ValueError(
            f'{out_dir} already holds {prefix!r} shards made {how}; pass --overwrite to replace '
            'them, or write to another --out-dir or --prefix'
        )
    for path in own:
        path.unlink()
    return {}


def _read_plan(path: Path) -> Optional[dict]:
    try:
        plan = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return None
    return plan if isinstance(plan, dict) else None


def _params_diff(old: Dict[str, Any], new: Dict[str, Any]) -> str:
    changed = [f'{k}: {old.get(k)!r} -> {new[k]!r}' for k in new if old.get(k) != new[k]]
    return 'with other parameters (' + ', '.join(changed) + ')'


def _is_finished(out_dir: Path, record: Optional[dict], num_samples: int) -> bool:
    """Recorded as finished with this many samples, and the file is still there at its recorded size."""
    if not record or record.get('num_samples') != num_samples:
        return False
    path = out_dir / record['name']
    return path.is_file() and path.stat().st_size == record['num_bytes']


# ------------------------------------------------------------------------------------------------- driver


def _resolve_encoding(
    source: Source, reencode: Optional[str], quality: int, resize_shorter: Optional[int], max_pixels: int
) -> Encoding:
    image_format = reencode or source.formats[0]
    if image_format not in source.formats:
        raise ValueError(f'{source.kind} images can be stored as {"/".join(source.formats)}, not {image_format}')
    if resize_shorter is not None and (image_format == 'as-is' or resize_shorter < 1):
        raise ValueError('--resize-shorter needs --reencode jpeg|png and a size >= 1')
    if not 1 <= quality <= 100:
        raise ValueError(f'--quality must be in 1..100, got {quality}')
    if max_pixels < 0:
        raise ValueError(f'--max-image-pixels must be >= 0 (0: no limit), got {max_pixels}')
    if image_format == 'as-is':
        _check_storable_as_is(source)
    return Encoding(image_format, quality, resize_shorter, max_pixels)


def _check_storable_as_is(source: Source) -> None:
    """Refuse, before writing, files that are not JPEG or PNG by name (content is checked as they are stored)."""
    for i, sample in enumerate(source.samples):
        if not sample.source.lower().endswith(_AS_IS_SUFFIXES):
            raise ValueError(
                f'cannot store image {source.location(i)} as-is: only JPEG and PNG files can be; '
                'use --reencode jpeg|png'
            )


def check_out_dir_outside(root: PathLike, out_dir: PathLike) -> None:
    """Shards written inside the image tree would be listed as a class folder of it by the next run."""
    root, out = Path(root).resolve(), Path(out_dir).resolve()
    if out != root and out.is_relative_to(root):
        raise ValueError(f'--out-dir {out_dir} is inside --root {root}: write the shards outside the image tree')


def _check_options(prefix: str, max_samples: int, max_bytes: Optional[int], workers: int) -> None:
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(f'prefix {prefix!r}: use letters, digits, "_", "-" and "."')
    if max_samples < 1 or (max_bytes is not None and max_bytes < 0) or workers < 1:
        raise ValueError(
            f'need max_samples >= 1, max_bytes >= 0 and workers >= 1; got {max_samples}, {max_bytes}, {workers}'
        )


def _plan_params(
    source: Source, prefix: str, seed: int, max_samples: int, max_bytes: Optional[int], encoding: Encoding
) -> Dict[str, Any]:
    """Everything the shard contents depend on: equal params, equal shards."""
    return {
        'format': SHARD_INDEX_FORMAT,
        'source': source.kind,
        'split': source.split,
        'prefix': prefix,
        'num_samples': len(source.samples),
        'listing_sha256': source.fingerprint(),
        'seed': seed,
        'max_samples': max_samples,
        'max_bytes': max_bytes,
        'image_format': encoding.image_format,
        'quality': encoding.quality if encoding.image_format == 'jpeg' else None,
        'resize_shorter': encoding.resize_shorter,
    }


def _sample_sizes(runner: _Runner, encoding: Encoding, progress: bool) -> List[int]:
    """Every sample's exact tar bytes; re-encoded images are encoded once here to be measured."""
    source = runner.source
    if encoding.image_format == 'as-is':
        image_sizes = []
        for s in source.samples:
            assert s.size is not None, 'an image folder sizes its files when it lists them'
            image_sizes.append(s.size)
    else:
        image_sizes = [0] * len(source.samples)
        measured = runner.imap_unordered(_measure_image, ((i, encoding) for i in range(len(image_sizes))), chunksize=64)
        for i, size in tqdm(measured, total=len(image_sizes), desc='measuring', unit='img', disable=not progress):
            image_sizes[i] = size
    return [_sample_bytes(source, i, size) for i, size in enumerate(image_sizes)]


def _make_plan(
    runner: _Runner,
    seed: int,
    max_samples: int,
    max_bytes: Optional[int],
    encoding: Encoding,
    recorded_lengths: Optional[List[int]],
    progress: bool,
) -> List[List[int]]:
    """The global permutation cut into shards; a resumed run reuses the recorded cut (no measuring pass)."""
    source = runner.source
    order = np.random.default_rng(seed).permutation(len(source.samples))
    if recorded_lengths and sum(recorded_lengths) == len(order):
        return [chunk.tolist() for chunk in np.split(order, np.cumsum(recorded_lengths)[:-1])]
    sizes = _sample_sizes(runner, encoding, progress) if max_bytes else None
    return plan_shards(order, max_samples, sizes, max_bytes, source.location)


def _index(source: Source, prefix: str, seed: int, encoding: Encoding, records: List[dict]) -> Dict[str, Any]:
    return {
        'format': SHARD_INDEX_FORMAT,
        'prefix': prefix,
        'split': source.split,
        'source': source.kind,
        'num_samples': sum(r['num_samples'] for r in records),
        'num_classes': len(source.classes),
        'classes': list(source.classes),
        'shards': [{k: r[k] for k in ('name', 'num_samples', 'num_bytes', 'sha256')} for r in records],
        'seed': seed,
        'image_format': encoding.image_format,
    }


def write_shards(
    source: Source,
    out_dir: PathLike,
    prefix: Optional[str] = None,
    *,
    seed: int = 0,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    max_bytes: Optional[int] = DEFAULT_MAX_BYTES,
    reencode: Optional[str] = None,
    quality: int = 90,
    resize_shorter: Optional[int] = None,
    workers: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Dict[str, Any]:
    """Write `source` as shards `{out_dir}/{prefix}-%06d.tar` plus `{prefix}-index.json`; return the index.

    prefix: defaults to the source's split. max_bytes: None or 0 for no byte bound. reencode: None stores
    the source's default ('as-is' for image folders, 'png' for Fashion-MNIST), or 'jpeg' / 'png'.
    workers: processes writing shards (default os.cpu_count()). max_pixels: an image whose header declares more
    pixels is refused, naming it, before it is decoded (0: no limit). Resumes an interrupted run with the same
    parameters; raises ValueError if out_dir holds shards made otherwise, unless overwrite.
    """
    prefix = prefix or source.split
    max_bytes = max_bytes or None
    workers = workers or os.cpu_count() or 1
    _check_options(prefix, max_samples, max_bytes, workers)
    encoding = _resolve_encoding(source, reencode, quality, resize_shorter, max_pixels)
    if isinstance(source, ImageFolderSource):
        check_out_dir_outside(source.root, out_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = _plan_params(source, prefix, seed, max_samples, max_bytes, encoding)
    previous = _previous_plan(out_dir, prefix, params, overwrite)

    runner = _Runner(source, workers)
    try:
        plan = _make_plan(runner, seed, max_samples, max_bytes, encoding, previous.get('shard_lengths'), progress)
        names = [_shard_name(prefix, n) for n in range(len(plan))]
        recorded = previous.get('finished', {})
        finished = {
            n: recorded[n] for n, shard in zip(names, plan) if _is_finished(out_dir, recorded.get(n), len(shard))
        }
        _index_path(out_dir, prefix).unlink(missing_ok=True)  # an index exists only over a complete set

        def save_plan() -> None:
            atomic_write_json(
                {'params': params, 'shard_lengths': [len(shard) for shard in plan], 'finished': finished},
                _plan_path(out_dir, prefix),
                indent=2,
                ensure_ascii=False,
            )

        save_plan()
        tasks = [
            (ShardTask(str(out_dir / n), tuple(shard), encoding, max_bytes),)
            for n, shard in zip(names, plan)
            if n not in finished
        ]
        with tqdm(
            total=sum(len(t[0].indices) for t in tasks), desc=f'{prefix} shards', unit='img', disable=not progress
        ) as bar:
            for record in runner.imap_unordered(_write_shard, tasks):
                finished[record['name']] = record
                save_plan()
                bar.update(record['num_samples'])
                bar.set_postfix_str(f'{len(finished)}/{len(plan)} shards')
    finally:
        runner.close()
        _remove_temporaries(out_dir, prefix)

    index = _index(source, prefix, seed, encoding, [finished[n] for n in names])
    atomic_write_json(index, _index_path(out_dir, prefix), indent=2, ensure_ascii=False)
    return index


# ---------------------------------------------------------------------------------------------------- CLI


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog='python -m skipssl.data.make_shards',
        description='Write an image collection as shuffled WebDataset tar shards.',
    )
    p.add_argument('--source', required=True, choices=sorted(SOURCES))
    p.add_argument(
        '--root', required=True, help=f'class-folder tree, or the folder of the IDX files (e.g. {FASHION_MNIST_ROOT})'
    )
    p.add_argument(
        '--split',
        help='split name; fashion-mnist: train (default) or test; imagefolder: recorded '
        "in the index, default the root folder's name",
    )
    p.add_argument('--out-dir', required=True)
    p.add_argument('--prefix', help='shard name prefix (default: the split)')
    p.add_argument('--max-samples', type=int, default=DEFAULT_MAX_SAMPLES)
    p.add_argument('--max-bytes', type=int, default=DEFAULT_MAX_BYTES, help='per shard file; 0: no bound')
    p.add_argument(
        '--reencode', choices=('jpeg', 'png'), help='re-encode images (default: imagefolder as-is, fashion-mnist png)'
    )
    p.add_argument('--quality', type=int, default=90, help='JPEG quality when re-encoding to JPEG')
    p.add_argument('--resize-shorter', type=int, help='resize the shorter side to N pixels (bicubic)')
    p.add_argument('--seed', type=int, default=0, help='seed of the global shuffle')
    p.add_argument('--workers', type=int, default=os.cpu_count() or 1)
    p.add_argument(
        '--max-image-pixels',
        type=int,
        default=MAX_IMAGE_PIXELS,
        help="refuse an image whose header declares more pixels (a decompression bomb); 0: no limit (default: PIL's)",
    )
    p.add_argument('--overwrite', action='store_true', help='replace shards made with other parameters')
    p.add_argument('--no-progress', action='store_true', help='no progress bars on stderr')
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    try:
        if args.source == ImageFolderSource.kind:  # before listing: the tree would hold the out-dir as a class
            check_out_dir_outside(args.root, args.out_dir)
        source = open_source(args.source, args.root, args.split)
        index = write_shards(
            source,
            args.out_dir,
            args.prefix,
            seed=args.seed,
            max_samples=args.max_samples,
            max_bytes=args.max_bytes,
            reencode=args.reencode,
            quality=args.quality,
            resize_shorter=args.resize_shorter,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            max_pixels=args.max_image_pixels,
        )
    except (OSError, ValueError) as err:  # bad input or paths: one line, the status argparse gives usage errors
        print(f'make_shards: error: {err}', file=sys.stderr)
        return 2
    print(
        f'{index["num_samples"]} samples in {len(index["shards"])} shards: '
        f'{_index_path(Path(args.out_dir), index["prefix"])}',
        file=sys.stderr,
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())

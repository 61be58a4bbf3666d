"""Image sources for the shard writer: an ImageFolder-style tree and Fashion-MNIST's IDX files.

A source lists its samples up front (key, label, provenance), so that the shard plan can be made, and
every input error reported, before any shard is written. It then serves one image at a time, by index,
to whichever process writes that image's shard.

    source = ImageFolderSource('/data/imagenet/train')           # split 'train' (the folder's name)
    source = FashionMNISTSource('/usr/share/datasets/fashion-mnist', 'test')
    source = open_source('fashion-mnist', root, 'train')          # by name, as the CLI does
"""

import gzip
import hashlib
import io
import logging
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
from PIL import Image

PathLike = Union[str, os.PathLike]
log = logging.getLogger(__name__)

# torchvision's ImageFolder extensions, matched case-insensitively (ImageNet's files end in .JPEG).
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
FASHION_MNIST_ROOT = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = (
    'T-shirt/top',
    'Trouser',
    'Pullover',
    'Dress',
    'Coat',
    'Sandal',
    'Shirt',
    'Sneaker',
    'Bag',
    'Ankle boot',
)
_FASHION_MNIST_FILES = {'train': 'train', 'test': 't10k'}  # split -> IDX file stem
_IDX_UBYTE = 0x08  # IDX type code of unsigned bytes, the only one Fashion-MNIST uses
# Keys become tar member names '{key}.{ext}'; USTAR stores at most 100 bytes of name when the name has no '/'.
MAX_KEY_LENGTH = 100 - len('.json')
_NOT_KEY_CHAR = re.compile(r'[^A-Za-z0-9_-]')


@dataclass(frozen=True)
class Sample:
    key: str  # webdataset __key__: unique, stable, no '.'
    label: int
    source: str  # provenance recorded in the sample's JSON
    size: Optional[int] = None  # bytes of the image file, when the image is a file


def sanitize_key(text: str) -> str:
    """Replace every character but ASCII letters, digits, '-' and '_' by '_'.

    ASCII only (not str.isalnum) keeps tar member names and URLs plain; '.' must go because webdataset
    splits key from extension at the first dot.
    """
    return _NOT_KEY_CHAR.sub('_', text)


class ImageFolderSource:
    """A tree root/<class>/**/<image>, as torchvision's ImageFolder and ImageNet's train/ and val/.

    Classes are the sorted sub-folder names (index 0..C-1); hidden files and folders are ignored, and
    anything not a regular file (a FIFO named .jpg would block the writer) is skipped with a warning. Keys
    are f'{class_dir}__{file_stem}' sanitized, where the stem keeps the path below the class folder when images
    are nested. Raises before anything is written: missing root, no class folders, a class folder without
    images, an image that cannot be stat'ed, two files with the same key, a key too long for a tar name.
    """

    kind = 'imagefolder'
    formats = ('as-is', 'jpeg', 'png')  # the first is the default

    def __init__(self, root: PathLike, split: Optional[str] = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f'image folder root not found (or not a directory): {self.root}')
        self.split = split or self.root.resolve().name
        self.classes = _class_dirs(self.root)
        self.samples = _list_images(self.root, self.classes)

    def location(self, index: int) -> str:
        return str(self.root / self.samples[index].source)

    def read_bytes(self, index: int) -> bytes:
        return (self.root / self.samples[index].source).read_bytes()

    def load_image(self, index: int) -> Image.Image:
        return pil_rgb(self.read_bytes(index))

    def fingerprint(self) -> str:
        """Hash of the listing (paths and sizes): a changed dataset cannot resume an old plan."""
        digest = hashlib.sha256()
        for sample in self.samples:
            digest.update(f'{sample.source}\t{sample.size}\n'.encode())
        return digest.hexdigest()


def pil_rgb(data: bytes) -> Image.Image:
    """An encoded image as RGB whatever it is (ImageNet has grayscale and CMYK JPEGs): what the training reader
    expects."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert('RGB')


def _class_dirs(root: Path) -> List[str]:
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith('.'))
    if not classes:
        raise ValueError(f'no class folders in {root}: expected one sub-folder of images per class')
    return classes


def _list_images(root: Path, classes: List[str]) -> List[Sample]:
    samples: List[Sample] = []
    owner: Dict[str, str] = {}
    for label, class_name in enumerate(classes):
        files = _image_files(root / class_name)
        if not files:
            raise ValueError(f'class folder {root / class_name} holds no images (extensions: {IMG_EXTENSIONS})')
        for path in files:
            relative = path.relative_to(root).as_posix()
            key = _image_key(class_name, path.relative_to(root / class_name))
            if key in owner:
                raise ValueError(f'{root / owner[key]} and {path} map to the same key {key!r}: rename one of them')
            if len(key) > MAX_KEY_LENGTH:
                raise ValueError(
                    f'{path}: key {key!r} is longer than {MAX_KEY_LENGTH} characters, too long for a '
                    'tar member name: shorten the file or class folder name'
                )
            owner[key] = relative
            samples.append(Sample(key, label, relative, _file_size(path)))
    return samples


def _image_key(class_name: str, in_class: Path) -> str:
    return f'{sanitize_key(class_name)}__{sanitize_key(in_class.with_suffix("").as_posix())}'


def _image_files(class_dir: Path) -> List[Path]:
    found = []
    walked = set()  # real folders: linked folders are followed, each once, so a link loop ends
    for folder, subdirs, names in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(folder)
        parent = os.path.realpath(os.path.dirname(folder))
        loop = folder != str(class_dir) and os.path.commonpath([real, parent]) == real
        if loop or real in walked:
            log.warning(
                'skipping %s: a symbolic link to %s, %s',
                folder,
                real,
                'a folder above it (a link loop)' if loop else 'whose images are listed already',
            )
            subdirs[:] = []
            continue
        walked.add(real)
        subdirs[:] = [d for d in subdirs if not d.startswith('.')]
        found += [Path(folder, n) for n in names if not n.startswith('.') and n.lower().endswith(IMG_EXTENSIONS)]
    return sorted(p for p in found if _regular(p))


def _regular(path: Path) -> bool:
    """A regular file (or a link to one); anything else (a FIFO would block the writer forever, a socket or
    device cannot be read as an image) is left out with a warning."""
    if path.is_file() or not path.exists():  # a dangling link is reported when its size is read
        return True
    log.warning('skipping %s: not a regular file', path)
    return False


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as err:
        raise FileNotFoundError(f'cannot read image file {path}: {err}') from err


class FashionMNISTSource:
    """Fashion-MNIST's train (60,000) or test (10,000) split, read from its gzip-compressed IDX files.

    Images are 28x28 8-bit grayscale, served as PIL 'L' images; always stored as PNG (lossless).
    """

    kind = 'fashion-mnist'
    formats = ('png',)
    classes = list(FASHION_MNIST_CLASSES)

    def __init__(self, root: PathLike = FASHION_MNIST_ROOT, split: str = 'train'):
        if split not in _FASHION_MNIST_FILES:
            raise ValueError(f'Fashion-MNIST split must be one of {sorted(_FASHION_MNIST_FILES)}, got {split!r}')
        self.root, self.split = Path(root), split
        stem = _FASHION_MNIST_FILES[split]
        self.images = read_idx(self.root / f'{stem}-images-idx3-ubyte.gz', ndim=3)
        self.labels = read_idx(self.root / f'{stem}-labels-idx1-ubyte.gz', ndim=1)
        _check_fashion_mnist(self.root / stem, self.images, self.labels)
        self.samples = [
            Sample(f'fmnist_{split}_{i:05d}', int(label), f'fashion-mnist/{split}/{i}')
            for i, label in enumerate(self.labels)
        ]

    def location(self, index: int) -> str:
        return self.samples[index].source

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])  # 2-D uint8 -> mode 'L'

    def fingerprint(self) -> str:
        return hashlib.sha256(self.images.tobytes() + self.labels.tobytes()).hexdigest()


def _check_fashion_mnist(stem: Path, images: np.ndarray, labels: np.ndarray) -> None:
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f'{stem}-*: {images.shape[0]} images but {labels.shape[0]} labels')
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f'{stem}-labels-idx1-ubyte.gz: label {labels.max()} outside 0..9')


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read a gzip-compressed IDX file of unsigned bytes with `ndim` dimensions (LeCun's MNIST format).

    Header: two zero bytes, the type code (0x08: unsigned byte), the number of dimensions, then each
    dimension as a big-endian uint32; the data follows, row-major.
    """
    if not path.is_file():
        raise FileNotFoundError(f'IDX file not found: {path}')
    try:
        with gzip.open(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f'{path}: not a readable gzip file ({err})') from err
    header = 4 + 4 * ndim
    if data[:4] != bytes((0, 0, _IDX_UBYTE, ndim)) or len(data) < header:
        raise ValueError(
            f'{path}: not an IDX file of unsigned bytes with {ndim} dimensions '
            f'(magic {data[:4].hex()}, expected {bytes((0, 0, _IDX_UBYTE, ndim)).hex()})'
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype='>u4', count=ndim, offset=4))
    if len(data) - header != math.prod(dims):
        raise ValueError(
            f'{path}: header says {dims} ({math.prod(dims)} bytes of data), file holds {len(data) - header}'
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


Source = Union[ImageFolderSource, FashionMNISTSource]
SOURCES = {cls.kind: cls for cls in (ImageFolderSource, FashionMNISTSource)}


def open_source(kind: str, root: PathLike, split: Optional[str] = None) -> Source:
    """The source named `kind` ('imagefolder' or 'fashion-mnist'); split None takes the source's default."""
    if kind not in SOURCES:
        raise ValueError(f'unknown source {kind!r}; choose one of {sorted(SOURCES)}')
    return SOURCES[kind](root, split) if split else SOURCES[kind](root)

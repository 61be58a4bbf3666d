"""An image's size from its header, checked before anything decodes it.

A decompression bomb is a small file that decodes to a huge image: a one-colour 30000 x 30000 PNG is 854 KB
on disk and 2.7 GB as RGB pixels, more with a decoder's working buffers. PIL refuses such files when it opens
them (``Image.MAX_IMAGE_PIXELS``), but torchvision's decoders do not, so every reader of images calls
:func:`check_pixels` on the encoded bytes first: JPEG, PNG and WebP headers are read here (a few hundred bytes,
no decoding); anything else is sized by PIL's header reader.
"""

import io
import struct
import warnings
from typing import Optional, Tuple

from PIL import Image

# PIL's default limit (about 89.5 megapixels, 0.25 GB as RGB): far above any photograph a ViT is trained on
MAX_IMAGE_PIXELS = 89_478_485
_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
# JPEG start-of-frame markers (SOF0..SOF15 but DHT, JPG and DAC, which share the range)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> Optional[Tuple[int, int]]:
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in _SOF:
            height, width = struct.unpack('>HH', data[i + 5 : i + 9])
            return width, height
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + struct.unpack('>H', data[i + 2 : i + 4])[0]
    return None


def _webp_size(data: bytes) -> Optional[Tuple[int, int]]:
    chunk = data[12:16]
    if chunk == b'VP8 ' and len(data) >= 30:
        w, h = struct.unpack('<HH', data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b'VP8L' and len(data) >= 25:
        bits = int.from_bytes(data[21:25], 'little')
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b'VP8X' and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], 'little'), 1 + int.from_bytes(data[27:30], 'little')
    return None


def image_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) that the header of an encoded image declares; None when no header can be read
    (ValueError for a header PIL itself refuses to open: beyond twice its limit)."""
    if data.startswith(_PNG_MAGIC) and len(data) >= 24 and data[12:16] == b'IHDR':
        w, h = struct.unpack('>II', data[16:24])
        return w, h
    if data.startswith(b'\xff\xd8'):
        return _jpeg_size(data)
    if data.startswith(b'RIFF') and data[8:12] == b'WEBP':
        return _webp_size(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Image.DecompressionBombError as exn:  # beyond twice PIL's own limit
        raise ValueError(f'{exn}; not decoded') from None
    except Exception:  # not an image PIL knows: the decoder's own error says so
        return None


def check_pixels(data: bytes, max_pixels: Optional[int] = MAX_IMAGE_PIXELS) -> None:
    """ValueError when ``data`` is empty, or its header declares more than ``max_pixels`` pixels (0 or None: no
    limit); the caller names the file or sample."""
    if not data:
        raise ValueError('empty image (0 bytes)')
    if not max_pixels:
        return
    size = image_size(data)
    if size is None:
        return
    w, h = size
    if w * h > max_pixels:
        raise ValueError(
            f'{w} x {h} pixels, more than the limit of {max_pixels} (a decompression bomb?); not decoded'
        )

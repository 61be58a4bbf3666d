"""Data path: shards, readers, multi-crop augmentation (CPU and device)."""

from .cpu_multicrop import MultiCropTransform
from .multicrop import BatchedMultiCrop, MultiCropConfig, TorchvisionMultiCrop, stack_crops

__all__ = ['BatchedMultiCrop', 'MultiCropConfig', 'MultiCropTransform', 'TorchvisionMultiCrop', 'stack_crops']
from .reader import (
    EvalShards,
    ReaderState,
    TooManyBadSamples,
    canvas_resize,
    decode_sample,
    eval_transform,
    first_readable_sample,
)
from .shards import read_index, resolve_shards
from .slots import SlotShards
from .sources import FashionMNISTSource, ImageFolderSource, open_source

__all__ += [
    'EvalShards',
    'ReaderState',
    'TooManyBadSamples',
    'canvas_resize',
    'decode_sample',
    'eval_transform',
    'first_readable_sample',
    'read_index',
    'resolve_shards',
    'SlotShards',
]
__all__ += ['FashionMNISTSource', 'ImageFolderSource', 'open_source']

"""Data path: shards, readers, multi-crop augmentation (CPU and device)."""
from .multicrop import BatchedMultiCrop, MultiCropConfig, MultiCropTransform, stack_crops

__all__ = ['BatchedMultiCrop', 'MultiCropConfig', 'MultiCropTransform', 'stack_crops']

"""Model analysis: per-block MSA outputs and CLS attention, and their CKA across blocks (SkipAt's Fig. 3)."""
from .capture import BlockCapture, block_kinds
from .cka import StreamingCKA, choose_skips, cka_from_hsic, unbiased_hsic

__all__ = ['BlockCapture', 'StreamingCKA', 'block_kinds', 'choose_skips', 'cka_from_hsic', 'unbiased_hsic']

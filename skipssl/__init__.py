"""skipssl: DINO self-supervised pretraining of SkipAt Vision Transformers.

Named ``skipssl``, not ``ssl``: a top-level ``ssl`` package would shadow Python's standard ``ssl`` module.
"""

from . import models  # noqa: F401  (registers the SkipAt models with timm)

__version__ = '0.1.0'

"""Per-iteration schedules (arrays indexed by the global step), as in DINO's reference code."""

import math

import numpy as np


def cosine_schedule(
    base_value: float,
    final_value: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Linear warm-up from ``start_warmup_value`` to ``base_value`` over ``warmup_iters`` steps, then a
    half cosine from ``base_value`` to ``final_value`` over the remaining steps. Length ``total_iters``."""
    if total_iters <= 0:
        raise ValueError(f'total_iters must be positive, got {total_iters}')
    if not 0 <= warmup_iters <= total_iters:
        raise ValueError(f'warmup_iters must be in [0, total_iters={total_iters}], got {warmup_iters}')
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    steps = np.arange(total_iters - warmup_iters)
    n = max(len(steps), 1)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(math.pi * steps / n))
    return np.concatenate((warmup, cosine))


def linear_warmup_schedule(start_value: float, value: float, total_iters: int, warmup_iters: int) -> np.ndarray:
    """Linear from ``start_value`` to ``value`` over ``warmup_iters`` steps, then constant (teacher temperature)."""
    if not 0 <= warmup_iters <= total_iters:
        raise ValueError(f'warmup_iters must be in [0, total_iters={total_iters}], got {warmup_iters}')
    return np.concatenate((np.linspace(start_value, value, warmup_iters), np.full(total_iters - warmup_iters, value)))


def epoch_warmup_schedule(
    start_value: float, value: float, epochs: int, warmup_epochs: int, iterations_per_epoch: int
) -> np.ndarray:
    """DINO's teacher temperature: ``np.linspace(start_value, value, warmup_epochs)`` then constant, one value
    per EPOCH (DINO's loss indexes it by the epoch), repeated over each epoch's iterations so that it is
    indexed by the global iteration like every other schedule. Length ``epochs * iterations_per_epoch``."""
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f'warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}')
    if iterations_per_epoch <= 0:
        raise ValueError(f'iterations_per_epoch must be positive, got {iterations_per_epoch}')
    per_epoch = np.concatenate((np.linspace(start_value, value, warmup_epochs), np.full(epochs - warmup_epochs, value)))
    return np.repeat(per_epoch, iterations_per_epoch)


def scaled_lr(base_lr: float, global_batch_size: int) -> float:
    """DINO's linear scaling rule: lr = base_lr * global batch / 256."""
    return base_lr * global_batch_size / 256.0

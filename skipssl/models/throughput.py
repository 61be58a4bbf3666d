"""Measured throughput of models compared with each other: interleaved timing on one device.

Each repeat times every model back to back, the order alternating between repeats, so a machine that drifts
(other jobs, clocks) hits all of them alike; ratios are taken per repeat, then the median.
"""

import statistics
import time
from typing import Callable, Dict, List, Mapping, Sequence

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so wall time covers it."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], iters: int, device: torch.device) -> float:
    """Seconds for ``iters`` calls of ``step``, device work included."""
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    return time.perf_counter() - t0


def interleaved_rates(
    steps: Mapping[str, Callable[[], None]],
    images_per_step: int,
    iters: int,
    repeats: int,
    device: torch.device,
    warmup: int = 1,
) -> Dict[str, List[float]]:
    """Images per second of each named step, one value per repeat, measured interleaved."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    rates: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            rates[name].append(images_per_step * iters / time_steps(steps[name], iters, device))
    return rates


def median_ratio(rates: Mapping[str, List[float]], num: str, den: str) -> float:
    """Median over repeats of rate[num] / rate[den] (paired per repeat)."""
    return statistics.median(a / b for a, b in zip(rates[num], rates[den]))


def rate_report(rates: Mapping[str, List[float]], base: str, other: str, keys: Sequence[str]) -> Dict:
    """What a comparison of ``other`` against ``base`` reports, under ``keys`` in this order: the median images/s
    of ``base`` and of ``other``, the median over repeats of other / base (:func:`median_ratio`), and every
    repeat's rates."""
    values = (statistics.median(rates[base]), statistics.median(rates[other]), median_ratio(rates, other, base), rates)
    return dict(zip(keys, values, strict=True))

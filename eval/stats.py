"""Spread over seeds and the confidence interval of a difference of means, for the report.

The t distribution's quantile is computed here (the regularised incomplete beta function by its continued
fraction, then bisection) because the project does not depend on SciPy; tests/test_eval_stats.py checks it
against Student's t table and the intervals against R's ``t.test`` on Student's sleep data.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

LEVEL = 0.95  # the report's confidence level


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (n - 1 in the denominator; None below two values) of n values."""

    n: int
    mean: Optional[float]
    std: Optional[float]


@dataclass(frozen=True)
class Difference:
    """A difference of means (first minus second) with its confidence interval, or why there is none.

    method: 'paired' (the mean of per-seed differences, n - 1 degrees of freedom) or 'welch' (two independent
    samples with unequal variances, Welch-Satterthwaite degrees of freedom)."""

    estimate: Optional[float]
    method: str
    n: List[int]  # [pairs] for 'paired', [n1, n2] for 'welch'
    level: float = LEVEL
    low: Optional[float] = None
    high: Optional[float] = None
    df: Optional[float] = None
    unavailable: Optional[str] = None  # why there is no interval


def spread(values: Sequence[float]) -> Spread:
    n = len(values)
    if n == 0:
        return Spread(0, None, None)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Spread(n, mean, std)


def welch_interval(x: Sequence[float], y: Sequence[float], level: float = LEVEL) -> Difference:
    """mean(x) - mean(y) with Welch's t interval: x and y independent samples, variances not assumed equal."""
    sx, sy = spread(x), spread(y)
    n = [sx.n, sy.n]
    if sx.mean is None or sy.mean is None:
        return Difference(None, 'welch', n, level, unavailable='no values on one side')
    estimate = sx.mean - sy.mean
    if sx.std is None or sy.std is None:
        return Difference(estimate, 'welch', n, level, unavailable=f'n={min(n)}: a standard deviation needs 2 seeds')
    vx, vy = sx.std**2 / sx.n, sy.std**2 / sy.n
    se = math.sqrt(vx + vy)
    if se == 0.0:  # identical values on both sides: no spread to scale, the interval is the point
        return Difference(estimate, 'welch', n, level, estimate, estimate, float(sx.n + sy.n - 2))
    df = (vx + vy) ** 2 / (vx**2 / (sx.n - 1) + vy**2 / (sy.n - 1))
    half = t_quantile(0.5 + level / 2, df) * se
    return Difference(estimate, 'welch', n, level, estimate - half, estimate + half, df)


def paired_interval(x: Sequence[float], y: Sequence[float], level: float = LEVEL) -> Difference:
    """mean(x - y) with the paired t interval: x[i] and y[i] measured on one unit (here: one seed)."""
    if len(x) != len(y):
        raise ValueError(f'paired samples of different lengths: {len(x)} and {len(y)}')
    d = spread([a - b for a, b in zip(x, y)])
    if d.mean is None:
        return Difference(None, 'paired', [0], level, unavailable='no pairs')
    if d.std is None:
        return Difference(d.mean, 'paired', [d.n], level, unavailable='n=1: a standard deviation needs 2 seeds')
    half = t_quantile(0.5 + level / 2, d.n - 1) * d.std / math.sqrt(d.n)
    return Difference(d.mean, 'paired', [d.n], level, d.mean - half, d.mean + half, float(d.n - 1))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (df > 0, not necessarily whole)."""
    tail = 0.5 * _regularized_beta(df / (df + t * t), df / 2, 0.5)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, by bisection on t_cdf (monotone): to float precision in 200 halvings."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f't_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}')
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def _regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), from the continued fraction on the side where it converges fast (Numerical Recipes, 6.4)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(x, a, b) / a
    return 1.0 - front * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of I_x(a, b), by the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h

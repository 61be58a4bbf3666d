"""The report's statistics against independent computations: Student's t table, the t distribution's CDF
from mpmath's incomplete beta function, and R's t.test on Student's sleep data (R's `sleep` data set)."""

import math
import statistics

import pytest

from skipssl_eval.stats import paired_interval, spread, t_cdf, t_quantile, welch_interval

# Cushny and Peebles' extra hours of sleep with two drugs, ten patients (Student 1908; R's `sleep`)
DRUG1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
DRUG2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


@pytest.mark.parametrize(
    'df, t',  # two-sided 95% critical values, as printed in t tables (3 decimals)
    [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (9, 2.262), (10, 2.228), (30, 2.042), (120, 1.980)],
)
def test_t_quantile_matches_the_table(df, t):
    assert t_quantile(0.975, df) == pytest.approx(t, abs=5e-4)
    assert t_quantile(0.025, df) == pytest.approx(-t, abs=5e-4)


def test_t_distribution_against_mpmath_at_fractional_degrees_of_freedom():
    mpmath = pytest.importorskip('mpmath')
    mpmath.mp.dps = 30
    for df in (1.3, 2.5, 4.7, 17.776, 250.0):
        for t in (-3.0, -0.4, 0.0, 0.9, 2.5, 8.0):
            # P(T <= t) = 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2 for t >= 0, symmetric below
            tail = mpmath.betainc(df / 2, 0.5, 0, df / (df + t * t), regularized=True) / 2
            expected = float(1 - tail if t >= 0 else tail)
            assert t_cdf(t, df) == pytest.approx(expected, abs=1e-12)
        q = t_quantile(0.975, df)
        assert float(1 - mpmath.betainc(df / 2, 0.5, 0, df / (df + q * q), regularized=True) / 2) == pytest.approx(
            0.975, abs=1e-12
        )
    assert t_quantile(0.975, 1e7) == pytest.approx(statistics.NormalDist().inv_cdf(0.975), abs=1e-6)


def test_intervals_on_students_sleep_data_match_r():
    # R: t.test(extra ~ group, data = sleep): t = -1.8608, df = 17.776, 95 percent CI -3.3654832 0.2054832
    w = welch_interval(DRUG1, DRUG2)
    assert (w.method, w.n, w.level) == ('welch', [10, 10], 0.95)
    assert w.estimate == pytest.approx(0.75 - 2.33)
    assert w.df == pytest.approx(17.776, abs=5e-4)
    assert (w.low, w.high) == pytest.approx((-3.3654832, 0.2054832), abs=5e-8)
    # R: t.test(DRUG1, DRUG2, paired = TRUE): t = -4.0621, df = 9, 95 percent CI -2.4598858 -0.7001142
    p = paired_interval(DRUG1, DRUG2)
    assert (p.method, p.n, p.df) == ('paired', [10], 9.0)
    assert (p.estimate, p.low, p.high) == pytest.approx((-1.58, -2.4598858, -0.7001142), abs=5e-8)


def test_spread_and_what_one_seed_cannot_give():
    s = spread([69.84, 70.10, 69.20])
    assert (s.n, s.mean, s.std) == (
        3,
        pytest.approx(69.7133333333),
        pytest.approx(statistics.stdev([69.84, 70.10, 69.20])),
    )
    assert spread([69.84]) == type(s)(1, 69.84, None) and spread([]).mean is None
    for d in (welch_interval([69.84], [70.62]), paired_interval([69.84], [70.62])):
        assert d.estimate == pytest.approx(-0.78) and d.low is None and d.high is None and d.df is None
        assert d.unavailable == 'n=1: a standard deviation needs 2 seeds'
    assert welch_interval([69.84, 70.1], [70.62]).unavailable == 'n=1: a standard deviation needs 2 seeds'
    assert welch_interval([], [70.62]).estimate is None
    same = welch_interval([1.0, 1.0], [0.5, 0.5])  # no spread at all: the interval is the point
    assert (same.low, same.high) == (0.5, 0.5)
    with pytest.raises(ValueError, match='paired samples of different lengths: 2 and 1'):
        paired_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match='0 < p < 1'):
        t_quantile(1.0, 3)
    assert math.isfinite(t_quantile(0.999999, 0.5))

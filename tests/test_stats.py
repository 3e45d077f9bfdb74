"""The statistics module against scipy and brute-force references."""
import numpy as np
import pytest
from scipy import stats as sps

from rlnlp import stats


def test_paired_difference_matches_scipy_ttest_rel():
    rng = np.random.default_rng(0)
    base = rng.normal(0.4, 0.3, size=57)
    method = base + 0.05 + rng.normal(0, 0.1, size=57)
    iv = stats.paired_difference(method, base)
    ref = sps.ttest_rel(method, base).confidence_interval(0.95)
    assert iv.n == 57 and iv.estimate == pytest.approx(np.mean(method - base), abs=1e-12)
    assert iv.low == pytest.approx(ref.low, abs=1e-6) and iv.high == pytest.approx(ref.high, abs=1e-6)
    ref90 = sps.ttest_rel(method, base).confidence_interval(0.90)
    iv90 = stats.paired_difference(method, base, confidence=0.90)
    assert (iv90.low, iv90.high) == pytest.approx((ref90.low, ref90.high), abs=1e-6)


def test_pairing_matters_and_dropping_it_would_be_detected():
    # a shared per-unit difficulty dominates the variance: the paired interval is much narrower than
    # an unpaired (Welch) one, and it excludes 0 where the unpaired one does not
    rng = np.random.default_rng(1)
    difficulty = rng.normal(0, 1.0, size=40)
    base = difficulty + rng.normal(0, 0.05, size=40)
    method = difficulty + 0.1 + rng.normal(0, 0.05, size=40)
    paired = stats.paired_difference(method, base)
    welch = sps.ttest_ind(method, base, equal_var=False).confidence_interval(0.95)
    assert paired.excludes_zero() and not (welch.low > 0)
    assert paired.half_width < (welch.high - welch.low) / 2 / 5
    # shuffling the baseline breaks the pairing and the result changes
    shuffled = stats.paired_difference(method, rng.permutation(base))
    assert shuffled.half_width > 5 * paired.half_width


def test_paired_difference_refuses_unmatched_units_and_nans():
    with pytest.raises(ValueError, match="matched units"):
        stats.paired_difference([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="non-finite"):
        stats.paired_difference([1, float("nan")], [1, 2])


def test_mean_interval_matches_scipy_t():
    x = np.random.default_rng(2).exponential(2.0, size=31)
    iv = stats.mean_interval(x)
    lo, hi = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert (iv.low, iv.high) == pytest.approx((lo, hi), abs=1e-6)
    one = stats.mean_interval([3.0])
    assert one.estimate == 3.0 and np.isnan(one.low) and one.verdict() == "no"


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (47, 60), (1, 1000)])
def test_wilson_matches_scipy(k, n):
    iv = stats.wilson(k, n)
    ref = sps.binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert iv.estimate == pytest.approx(k / n)
    assert iv.low == pytest.approx(ref.low, abs=1e-6) and iv.high == pytest.approx(ref.high, abs=1e-6)
    assert stats.wilson([1] * k + [0] * (n - k)).low == pytest.approx(iv.low, abs=1e-12)


def test_wilson_rejects_impossible_counts():
    with pytest.raises(ValueError):
        stats.wilson(5, 4)
    with pytest.raises(ValueError):
        stats.wilson(0, 0)


def test_bootstrap_agrees_with_a_brute_force_resampling_loop():
    rng = np.random.default_rng(3)
    x = rng.normal(size=25)
    y = 0.7 * x + rng.normal(scale=0.5, size=25)
    corr = lambda a, b: np.corrcoef(a, b)[0, 1]  # noqa: E731
    iv = stats.bootstrap(corr, x, y, n_resamples=4000, seed=7)
    # brute force: a plain loop over resamples with its own generator
    brute_rng = np.random.default_rng(123)
    draws = []
    for _ in range(4000):
        i = brute_rng.integers(0, 25, size=25)
        draws.append(corr(x[i], y[i]))
    lo, hi = np.quantile(draws, [0.025, 0.975])
    assert iv.estimate == pytest.approx(corr(x, y))
    # two independent Monte Carlo estimates of the same quantiles: agree within Monte Carlo error
    assert abs(iv.low - lo) < 0.04 and abs(iv.high - hi) < 0.04
    assert iv.low < iv.estimate < iv.high


def test_bootstrap_keeps_pairs_together():
    # y = x exactly: a paired resample always gives correlation 1; an unpaired one would not
    x = np.arange(20, dtype=float)
    iv = stats.bootstrap(lambda a, b: np.corrcoef(a, b)[0, 1], x, x.copy(), n_resamples=500)
    assert iv.low == pytest.approx(1.0) and iv.high == pytest.approx(1.0)


def test_binned_rate_counts_every_episode_that_ended_in_a_window():
    # two short successful episodes end early; many long failures end later in the same window
    ends = np.array([1, 2, 9, 9, 9, 9, 15, 18])
    succ = np.array([1, 1, 0, 0, 0, 0, 1, 1])
    out = stats.binned_rate(ends, succ, edges=[0, 10, 20])
    assert out["n"].tolist() == [6, 2]
    assert out["mean"][0] == pytest.approx(2 / 6) and out["mean"][1] == pytest.approx(1.0)
    assert out["low"][0] < 2 / 6 < out["high"][0]
    empty = stats.binned_rate(ends, succ, edges=[0, 10, 20, 30])
    assert np.isnan(empty["mean"][2]) and empty["n"][2] == 0


def test_verdict_respects_direction():
    up = stats.Interval(0.1, 0.02, 0.2, 30)
    assert up.verdict(True) == "yes" and up.verdict(False) == "worse"
    assert stats.Interval(0.1, -0.02, 0.2, 30).verdict() == "no"
    assert str(up) == "+0.100 [+0.020, +0.200]"


def test_spearman_is_the_pearson_correlation_of_ranks_and_nan_for_a_constant():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=40), rng.normal(size=40)
    b[:20] += 2 * a[:20]
    ranks = lambda x: np.argsort(np.argsort(x))  # no ties in continuous draws
    assert stats.spearman(a, b) == pytest.approx(np.corrcoef(ranks(a), ranks(b))[0, 1], abs=1e-12)
    assert stats.spearman(a, -a) == pytest.approx(-1.0)
    assert np.isnan(stats.spearman(a, np.full_like(a, 2.0)))

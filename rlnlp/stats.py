"""The statistics every notebook uses for its headline numbers: one place, tested against scipy.

* ``paired_difference(method, baseline)`` — mean of the per-unit differences with a 95% t-interval.
  Units are MATCHED: the same start states, prompts, pools or seeds scored by both. Pairing removes
  the variance shared by the two scores (a hard state is hard for both), which is what lets a few
  hundred units detect a change of a few points.
* ``mean_interval(values)`` — a t-interval for one mean (e.g. a mean return).
* ``wilson(successes, n)`` — the Wilson score interval for a success rate (sane at 0/n and n/n,
  where the normal interval collapses to a point).
* ``bootstrap(statistic, *arrays)`` — a percentile bootstrap over units for anything else
  (a Spearman ρ, a ratio, a share of a gap closed); arrays are resampled together, so pairs stay paired.
* ``binned_rate(ends, values, edges)`` — a training curve without length bias: each point averages
  EVERY episode that ended inside its window (not one episode per logging step).

Every function returns an :class:`Interval`; ``str(interval)`` prints ``+0.123 [+0.045, +0.201]``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class Interval:
    """An estimate with a two-sided confidence interval over ``n`` units."""

    estimate: float
    low: float
    high: float
    n: int
    confidence: float = 0.95
    method: str = ""

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)

    def verdict(self, higher_is_better: bool = True) -> str:
        """``"yes"`` when the interval lies wholly on the good side of 0, ``"worse"`` on the bad side,
        ``"no"`` when it straddles 0 (or is undefined)."""
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return "no"
        good = self.low > 0 if higher_is_better else self.high < 0
        bad = self.high < 0 if higher_is_better else self.low > 0
        return "yes" if good else "worse" if bad else "no"

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self, digits: int = 3, signed: bool = True) -> str:
        f = f"{{:{'+' if signed else ''}.{digits}f}}"
        return f"{f.format(self.estimate)} [{f.format(self.low)}, {f.format(self.high)}]"

    def __str__(self) -> str:
        return self.format()


def _finite(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float).ravel()
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has {int((~np.isfinite(a)).sum())} non-finite value(s); drop or fill them first")
    return a


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of ``values`` with a Student-t interval: mean ± t_{(1+c)/2, n−1} · s/√n (NaN bounds for n < 2)."""
    from scipy import stats

    x = _finite(values, "values")
    n = len(x)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, float("nan"), float("nan"), n, confidence, "t")
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n, confidence, "t")


def paired_difference(method: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of (method_i − baseline_i) over matched units i, with a paired t-interval.

    ``method[i]`` and ``baseline[i]`` must score the SAME unit (state, prompt, pool, seed); a unit
    may itself be an average over several samples. Equal-length inputs are required — a pairing
    cannot be recovered from two unaligned lists.
    """
    a, b = _finite(method, "method"), _finite(baseline, "baseline")
    if a.shape != b.shape:
        raise ValueError(f"paired_difference needs matched units: {len(a)} method values vs {len(b)} baseline values")
    iv = mean_interval(a - b, confidence)
    return Interval(iv.estimate, iv.low, iv.high, iv.n, confidence, "paired t")


def wilson(successes: int | Sequence[bool], n: int | None = None, confidence: float = 0.95) -> Interval:
    """Wilson score interval for a success rate: ``wilson(k, n)`` or ``wilson(array_of_bools)``.

    (p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n),  z = Φ⁻¹((1+c)/2).
    """
    from scipy import stats

    if n is None:
        x = _finite(successes, "successes")
        k, n = float(x.sum()), len(x)
    else:
        k = float(successes)
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 ≤ successes ≤ n and n > 0 (got {k:g} of {n})")
    z = float(stats.norm.ppf((1 + confidence) / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), int(n), confidence, "Wilson")


def bootstrap(statistic: Callable[..., float], *arrays: Sequence, n_resamples: int = 10_000, confidence: float = 0.95,
              seed: int = 0) -> Interval:
    """Percentile bootstrap of ``statistic(*arrays)`` over units.

    The arrays share their first axis (one entry per unit) and are resampled TOGETHER with the same
    indices, so paired data stay paired (e.g. ``bootstrap(spearman, v_exact, v_critic)``).
    """
    arrs = [np.asarray(a) for a in arrays]
    if not arrs:
        raise ValueError("bootstrap needs at least one array")
    n = len(arrs[0])
    if n < 2 or any(len(a) != n for a in arrs):
        raise ValueError(f"bootstrap needs ≥ 2 units and arrays of one length (got {[len(a) for a in arrs]})")
    rng = np.random.default_rng(seed)
    estimate = float(statistic(*arrs))
    idx = rng.integers(0, n, size=(n_resamples, n))
    draws = np.array([statistic(*(a[i] for a in arrs)) for i in idx], dtype=float)
    draws = draws[np.isfinite(draws)]
    alpha = (1 - confidence) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha]) if len(draws) else (float("nan"), float("nan"))
    return Interval(estimate, float(low), float(high), n, confidence, "bootstrap")


def spearman(exact: Sequence[float], predicted: Sequence[float]) -> float:
    """Spearman rank correlation (NaN when either side is constant: a constant ranks nothing)."""
    from scipy.stats import spearmanr

    if np.ptp(exact) == 0 or np.ptp(predicted) == 0:
        return float("nan")
    return float(spearmanr(exact, predicted).statistic)


def binned_rate(ends: Sequence[float], values: Sequence[float], edges: Sequence[float] | int) -> dict:
    """Average ``values`` of the episodes that ENDED in each window ``[edges[j], edges[j+1])``.

    ``ends``: when each episode ended (environment step or update); ``values``: its success (0/1)
    or return. An int ``edges`` makes that many equal windows over the range of ``ends``. Returns
    arrays ``x`` (window centres), ``mean``, ``n`` (episodes per window) and, for 0/1 values,
    Wilson bounds ``low``/``high``. Windows with no episode give NaN (plotted as a gap).
    """
    e, v = np.asarray(ends, float), np.asarray(values, float)
    if e.shape != v.shape:
        raise ValueError(f"binned_rate: {len(e)} end times vs {len(v)} values")
    if isinstance(edges, (int, np.integer)):
        hi = e.max() if len(e) else 1.0
        edges = np.linspace(min(0.0, e.min()) if len(e) else 0.0, hi + 1e-9, int(edges) + 1)
    edges = np.asarray(edges, float)
    which = np.digitize(e, edges) - 1
    binary = bool(len(v)) and np.isin(v, (0.0, 1.0)).all()
    out = {"x": (edges[:-1] + edges[1:]) / 2, "mean": [], "n": [], "low": [], "high": []}
    for j in range(len(edges) - 1):
        sel = v[which == j]
        out["n"].append(len(sel))
        if len(sel) == 0:
            out["mean"].append(np.nan), out["low"].append(np.nan), out["high"].append(np.nan)
            continue
        out["mean"].append(float(sel.mean()))
        if binary:
            iv = wilson(int(sel.sum()), len(sel))
            out["low"].append(iv.low), out["high"].append(iv.high)
        else:
            out["low"].append(np.nan), out["high"].append(np.nan)
    return {k: np.asarray(val, float) if k != "x" else val for k, val in out.items()}


def share_of_gap(method: float, low_ref: float, high_ref: float) -> float:
    """(method − low_ref) / (high_ref − low_ref): 0 at the low reference, 1 at the high one."""
    gap = high_ref - low_ref
    return float("nan") if gap == 0 else float((method - low_ref) / gap)

"""How sure a number is: bootstrap intervals, intervals on shares, and paired comparisons.

One place for the statistics the findings state, so every sentence uses the same rule:
- an interval is a 95 % percentile bootstrap over the units that were sampled (images, probe images), seeded;
- a share k of n gets Wilson's score interval (it stays inside [0, 1] and is sane for k = 0 or k = n);
- two things measured on the same images are compared pairwise: the mean of the per-image differences, its
  bootstrap interval, and the two-sided Wilcoxon signed-rank p-value. A difference is *significant* only when
  the interval excludes zero and p < ALPHA; otherwise the findings say "within noise" and do not rank. With 5
  images the signed-rank test cannot go below p = 0.0625, so 5 images never separate two methods: that is the
  honest answer, and the findings say how many images there were.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

LEVEL = 0.95  # the coverage of every interval the report prints
ALPHA = 0.05  # the significance level of every comparison
RESAMPLES = 2000  # bootstrap resamples: the interval's ends move by well under 1 % of its width between seeds
SEED = 0


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float
    n: int

    def covers(self, x: float = 0.0) -> bool:
        return self.low <= x <= self.high

    def format(self, digits: int = 2) -> str:
        """`0.35 [0.21, 0.48]`, the form of every table and sentence."""
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}


@dataclass(frozen=True)
class Comparison:
    """a − b over n paired observations."""
    difference: Interval
    p_value: float
    n: int

    @property
    def significant(self) -> bool:
        return self.n >= 2 and not self.difference.covers(0.0) and self.p_value < ALPHA

    def as_dict(self) -> dict:
        return {"difference": self.difference.value, "low": self.difference.low, "high": self.difference.high,
                "p_value": self.p_value, "n": self.n, "significant": self.significant}


def bootstrap(values: Sequence[float] | np.ndarray, statistic: Callable[[np.ndarray], float] = np.mean,
              resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> Interval:
    """The statistic of `values` (resampled along the first axis) with its percentile bootstrap interval.
    NaNs are dropped first; with fewer than 2 values the interval is the value itself (nothing to resample)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    value = float(statistic(x))
    if n < 2:
        return Interval(value, value, value, n)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(resamples, n))
    if statistic is np.mean and x.ndim == 1:
        draws = x[picks].mean(axis=1)  # the common case, vectorised
    else:
        draws = np.array([statistic(x[p]) for p in picks], dtype=np.float64)
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return Interval(value, float(min(low, value)), float(max(high, value)), n)


def share(k: int, n: int, level: float = LEVEL) -> Interval:
    """k of n as a share with Wilson's score interval."""
    if n <= 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    from scipy.stats import norm

    z = float(norm.ppf(1 - (1 - level) / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Interval(p, float(max(0.0, centre - half)), float(min(1.0, centre + half)), n)


def paired(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED) -> Comparison:
    """Compare two measures taken on the same items (images): the mean of a − b with its bootstrap interval and
    the Wilcoxon signed-rank p-value (exact for small n; 1.0 when every difference is zero). Pairs with a NaN on
    either side are dropped."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison of {a.shape} against {b.shape} values")
    keep = ~(np.isnan(a) | np.isnan(b))
    d = a[keep] - b[keep]
    interval = bootstrap(d, resamples=resamples, seed=seed)
    if len(d) < 2 or not np.any(d != 0):
        return Comparison(interval, 1.0, len(d))
    from scipy.stats import wilcoxon

    p = float(wilcoxon(d, zero_method="zsplit", alternative="two-sided").pvalue)
    return Comparison(interval, p, len(d))


def compare_words(comparison: Comparison, digits: int = 3, higher: str = "higher", lower: str = "lower",
                  item: str = "image") -> str:
    """The clause a finding uses: 'higher by 0.041 [0.012, 0.070], p = 0.03 over 12 images' or 'within noise
    (difference 0.004 [-0.020, 0.031], p = 0.44 over 5 images)'."""
    d = comparison.difference
    over = f"p = {comparison.p_value:.2g} over {comparison.n} {item}{'s' if comparison.n != 1 else ''}"
    if not comparison.significant:
        return f"within noise (difference {d.format(digits)}, {over})"
    return f"{higher if d.value > 0 else lower} by {abs(d.value):.{digits}f} [{d.low:.{digits}f}, {d.high:.{digits}f}], {over}"


def from_draws(value: float, draws: Sequence[float] | np.ndarray, n: int, level: float = LEVEL) -> Interval:
    """The percentile interval of a statistic whose bootstrap draws were made elsewhere (a dissection relabels
    resampled probe images, which only its own task can do); `n` is the number of items that were resampled.
    As in `bootstrap`, the interval is widened to hold the value itself."""
    d = np.asarray(draws, dtype=np.float64)
    d = d[~np.isnan(d)]
    if len(d) == 0:
        return Interval(float(value), float(value), float(value), n)
    tail = (1 - level) / 2
    low, high = np.quantile(d, [tail, 1 - tail])
    return Interval(float(value), float(min(low, value)), float(max(high, value)), n)


def paired_draws(value_a: float, value_b: float, draws_a: Sequence[float] | np.ndarray,
                 draws_b: Sequence[float] | np.ndarray, n: int, level: float = LEVEL) -> Comparison:
    """a − b when both were bootstrapped on the same resamples (draw i of a and of b saw the same items): the
    interval of the paired differences and the two-sided bootstrap p-value, twice the smaller share of
    differences on either side of zero. It is 0 when every draw falls on one side: then p is below the
    resolution of the draws (1/draws), and a sentence says so ("p < 0.05 over 20 resamples")."""
    da, db = np.asarray(draws_a, dtype=np.float64), np.asarray(draws_b, dtype=np.float64)
    if da.shape != db.shape:
        raise ValueError(f"paired draws of {da.shape} against {db.shape} values")
    d = da - db
    interval = from_draws(value_a - value_b, d, n, level)
    if len(d) == 0:
        return Comparison(interval, 1.0, n)
    tail = min(np.mean(d <= 0), np.mean(d >= 0))
    return Comparison(interval, float(min(1.0, 2 * tail)), n)

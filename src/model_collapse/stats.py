"""Statistics over seeds: means with Student-t confidence intervals, paired differences, correlations.

Each seed is an independent replicate of the whole study (its own real subset, iteration 0, models, samples and
feature network), so per-seed values are independent draws. With 3-10 seeds the t interval is the standard
choice (a bootstrap over so few values under-covers); paired differences (arm A minus arm B within each seed)
remove what the two arms of a seed share (the same iteration 0 and real subset). Correlations are averaged on
Fisher's z scale and transformed back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sst

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    ci_low: float | None  # None with fewer than two values
    ci_high: float | None
    n: int
    sd: float | None = None  # sample standard deviation of the values

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n, "sd": self.sd}


def number(v) -> float | None:
    """v when it is a finite number (not a bool), else None: what a metrics row's value counts as."""
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _finite(values) -> np.ndarray:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    return v[np.isfinite(v)]


def mean_ci(values, level: float = LEVEL) -> Interval:
    """Mean and the two-sided Student-t interval mean +- t_{(1+level)/2, n-1} sd / sqrt(n) of the finite values."""
    v = _finite(values)
    n = len(v)
    if n == 0:
        return Interval(math.nan, None, None, 0)
    m = float(v.mean())
    if n < 2:
        return Interval(m, None, None, n)
    sd = float(v.std(ddof=1))
    half = float(sst.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(m, m - half, m + half, n, sd)


def paired_difference(a: dict, b: dict, level: float = LEVEL) -> Interval:
    """A minus B over the seeds both have a finite value for: {seed: value} each."""
    seeds = sorted(s for s in set(a) & set(b) if _finite([a[s], b[s]]).size == 2)
    return mean_ci([a[s] - b[s] for s in seeds], level)


def pearson_r(x, y) -> float | None:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def correlation_ci(rs, level: float = LEVEL) -> Interval:
    """Mean correlation over seeds with its interval, on Fisher's z = artanh(r) scale, transformed back."""
    r = np.clip(_finite(rs), -0.999999, 0.999999)
    z = mean_ci(np.arctanh(r), level)
    back = (lambda v: None if v is None else float(np.tanh(v)))
    return Interval(back(z.mean) if z.n else math.nan, back(z.ci_low), back(z.ci_high), z.n, z.sd)


def verdict(iv: Interval, threshold: float, direction: str) -> str:
    """`holds` when the whole interval lies on the claimed side of the threshold (direction `above` or
    `below`), `fails` when it lies wholly on the other side (or at it), `inconclusive` when it straddles the
    threshold or there is no interval (one seed)."""
    if iv.ci_low is None or iv.ci_high is None:
        return "inconclusive"
    if direction == "above":
        return "holds" if iv.ci_low > threshold else "fails" if iv.ci_high <= threshold else "inconclusive"
    return "holds" if iv.ci_high < threshold else "fails" if iv.ci_low >= threshold else "inconclusive"

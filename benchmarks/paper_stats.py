"""The statistics of `paper_findings.py`: paired differences over seeds, 95% intervals, and the verdict rule.

The rule is fixed before any run and applied mechanically (``verdict_*``); the page states it above the
results. Every comparison is a paired difference d_s = loss(variant, seed s) - loss(baseline, seed s) (runs with
the same seed share initialisation seed, data order and routing noise). Its 95% interval is the t interval of
the mean of d over the seeds: mean ± t(0.975, n-1) * sd / sqrt(n).

- "lower" claims (the variant reaches a lower loss): **held** when the interval lies below 0, **not
  reproduced** when it lies above 0, **inconclusive** when it contains 0.
- "matches" claims (the variant's loss equals the baseline's within ``margin``; an equivalence test):
  **held** when the interval lies inside (-margin, +margin), **not reproduced** when it lies wholly outside
  that band, **inconclusive** otherwise.
- "not worse" claims (the variant is at most ``margin`` worse; a non-inferiority test): **held** when the
  interval's upper end is below +margin, **not reproduced** when its lower end is above +margin,
  **inconclusive** otherwise.
- A claim made of several parts is held when every part is held, not reproduced when any part is not
  reproduced, inconclusive otherwise.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

HELD, NOT_REPRODUCED, INCONCLUSIVE = "held", "not reproduced", "inconclusive"

# two-sided 95% quantiles of Student's t, t(0.975, df), df = 1..30 (standard tables)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t975(df: int) -> float:
    """t(0.975, df); the normal quantile 1.96 beyond the table (df > 30)."""
    if df < 1:
        raise ValueError(f"df={df}: an interval needs at least 2 seeds")
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Interval:
    """Mean of paired differences and its 95% t interval (lo, hi); n seeds."""

    mean: float
    lo: float
    hi: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:+.4f} [{self.lo:+.4f}, {self.hi:+.4f}]"


def interval(diffs: list[float]) -> Interval:
    """The 95% t interval of the mean of ``diffs`` (one value per seed; one seed gives a zero-width interval,
    which the verdicts treat as no evidence)."""
    n = len(diffs)
    if n == 0:
        raise ValueError("no differences")
    mean = statistics.fmean(diffs)
    if n == 1:
        return Interval(mean, -math.inf, math.inf, 1)
    half = t975(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def verdict_lower(ci: Interval) -> str:
    if ci.hi < 0:
        return HELD
    if ci.lo > 0:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def verdict_matches(ci: Interval, margin: float) -> str:
    if -margin < ci.lo and ci.hi < margin:
        return HELD
    if ci.lo >= margin or ci.hi <= -margin:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def verdict_not_worse(ci: Interval, margin: float) -> str:
    if ci.hi < margin:
        return HELD
    if ci.lo > margin:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def combine(verdicts: list[str]) -> str:
    if verdicts and all(v == HELD for v in verdicts):
        return HELD
    if NOT_REPRODUCED in verdicts:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def band(values: list[float]) -> tuple[float, float, float]:
    """(mean, lower, upper) of a 95% t interval of the mean of ``values`` (the plots' error bands)."""
    ci = interval(values)
    if ci.n == 1:
        return ci.mean, ci.mean, ci.mean
    return ci.mean, ci.lo, ci.hi

"""The statistics of the sweep report, on ``scipy.stats``.

- ``interval``: mean, sample std and the two-sided t-interval of a configuration's test accuracy
  over its replicates (seeds, and data split seeds when the sweep varies them).
- ``paired``: the paired comparison of two configurations on the replicates they share: the mean
  difference, its t-interval and the two-sided paired t-test.
- ``holm``: Holm's step-down correction of a table's p-values (family-wise error at alpha).
- ``pairs_for_power``: how many pairs a paired t-test needs to detect a difference with a given
  power, from the noncentral t distribution.

Accuracies are fractions of a finite test set, so two differences that are equal in exact
arithmetic must compare equal here too: differences are rounded to ``DECIMALS`` places, far finer
than one sample of any test set, before their spread is computed. A spread of exactly zero gets
the limit of the t-test instead of a NaN: no difference at all is p = 1, the same nonzero
difference in every pair is p = 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05
LEVEL = 0.95
POWER = 0.8
DECIMALS = 10
MAX_PAIRS = 100_000  # beyond this, "how many seeds" has no useful answer


@dataclass(frozen=True)
class Interval:
    n: int
    mean: float | None
    std: float | None  # sample std (ddof 1); None below 2 values
    low: float | None  # the t-interval at LEVEL; None below 2 values
    high: float | None


def _finite(values: Sequence[float]) -> np.ndarray:
    array = np.asarray([v for v in values if v is not None], dtype=float)
    return array[np.isfinite(array)]


def interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean, std and the t-interval of the mean of ``values`` (missing and non-finite left out)."""
    array = _finite(values)
    n = len(array)
    if n == 0:
        return Interval(0, None, None, None, None)
    mean = float(array.mean())
    if n < 2:
        return Interval(1, mean, None, None, None)
    std = float(array.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return Interval(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Paired:
    n: int
    mean: float | None  # mean of candidate - baseline
    sd: float | None  # sample std of the differences
    low: float | None
    high: float | None
    p: float | None  # two-sided paired t-test; None below 2 pairs


def paired(candidate: Sequence[float], baseline: Sequence[float], level: float = LEVEL) -> Paired:
    """The paired comparison of ``candidate`` against ``baseline``, element by element."""
    if len(candidate) != len(baseline):
        raise ValueError(f"paired values need equal lengths, got {len(candidate)} and {len(baseline)}")
    diffs = np.round(np.asarray(candidate, dtype=float) - np.asarray(baseline, dtype=float), DECIMALS)
    n = len(diffs)
    if n == 0:
        return Paired(0, None, None, None, None, None)
    mean = float(diffs.mean())
    if n < 2:
        return Paired(1, mean, None, None, None, None)
    sd = float(diffs.std(ddof=1))
    if sd == 0.0:
        return Paired(n, mean, 0.0, mean, mean, 1.0 if mean == 0.0 else 0.0)
    test = stats.ttest_rel(diffs, np.zeros(n))
    ci = test.confidence_interval(level)
    return Paired(n, mean, sd, float(ci.low), float(ci.high), float(test.pvalue))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values, in the input's order; None stays None and is not
    counted among the tests. Reject at ``alpha`` where the adjusted value is below it."""
    tested = [(p, i) for i, p in enumerate(p_values) if p is not None]
    m = len(tested)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(tested)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def verdict(mean: float | None, p_adjusted: float | None, n: int, alpha: float = ALPHA) -> str:
    if n < 2 or p_adjusted is None or mean is None:
        return f"fewer than 2 pairs ({n})"
    if p_adjusted < alpha and mean > 0:
        return "better"
    if p_adjusted < alpha and mean < 0:
        return "worse"
    return "not distinguishable"


def paired_power(n: int, effect: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test with ``n`` pairs for a standardized ``effect``
    (mean difference / std of the differences)."""
    df = n - 1
    critical = stats.t.ppf(1 - alpha / 2, df)
    shift = abs(effect) * math.sqrt(n)
    return float(stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift))


def pairs_for_power(mean: float | None, sd: float | None, power: float = POWER, alpha: float = ALPHA) -> int | None:
    """The fewest pairs (at least 2) whose paired t-test detects a true difference ``mean`` with
    spread ``sd`` with probability ``power``; None when there is no difference to detect or it
    would take more than ``MAX_PAIRS``."""
    if mean is None or sd is None or mean == 0.0:
        return None
    if sd == 0.0:
        return 2
    effect = abs(mean) / sd
    low, high = 2, 2
    while paired_power(high, effect, alpha) < power:
        if high >= MAX_PAIRS:
            return None
        low, high = high, min(high * 2, MAX_PAIRS)
    while low < high:  # power grows with n: the first n that reaches it
        middle = (low + high) // 2
        if paired_power(middle, effect, alpha) >= power:
            high = middle
        else:
            low = middle + 1
    return high

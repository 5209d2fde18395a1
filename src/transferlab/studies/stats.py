"""Seed statistics that do not overclaim: t-intervals, paired tests, Holm's correction, and the
cases where an interval means nothing (too few seeds, identical differences, a coarse test split)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

MIN_SEEDS = 3  # fewer paired seeds never get a verdict: a 2-seed t-interval is one difference wide
ALPHA = 0.05
SIGNIFICANT = ("A > B (significant)", "B > A (significant)")
WITHIN_NOISE = "within noise"


def ci_halfwidth(values: Sequence[float], confidence: float = 0.95) -> float:
    """Student-t half-width of the mean's CI; NaN for fewer than two values (no spread known)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def clipped_interval(mean: float, half: float, low: float = 0.0, high: float = 100.0) -> tuple[float, float]:
    """mean ± half, clipped to what an accuracy can be: a CI reaching 101 % says nothing true."""
    if math.isnan(half):
        return math.nan, math.nan
    return max(low, mean - half), min(high, mean + half)


def _all_equal(x: np.ndarray) -> bool:
    """Equal up to float noise: 0.7778 - 0.7222 is not bitwise equal on every seed."""
    return bool(np.ptp(x) <= 1e-9 * max(1.0, float(np.abs(x).max())))


def paired_p(diffs: Sequence[float]) -> float:
    """Two-sided paired t-test p-value of mean(diffs) != 0; NaN when it is undefined."""
    x = np.asarray(diffs, dtype=float)
    if len(x) < 2 or _all_equal(x):
        return math.nan
    return float(stats.ttest_1samp(x, 0.0).pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaNs stay NaN and do not count as tests)."""
    p = np.asarray(p_values, dtype=float)
    tested = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(len(p), math.nan)
    running = 0.0
    for rank, i in enumerate(tested[np.argsort(p[tested], kind="stable")]):
        running = max(running, min(1.0, (len(tested) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def verdict(diffs: Sequence[float], p_adjusted: float, quantum: float = math.nan) -> str:
    """What the paired differences (pts) support. `quantum` is one test image in pts."""
    x = np.asarray(diffs, dtype=float)
    if len(x) < MIN_SEEDS:
        return f"too few seeds (n={len(x)} < {MIN_SEEDS})"
    if _all_equal(x):
        return "degenerate: same difference on every seed"
    if not math.isnan(quantum) and ci_halfwidth(x) < quantum:
        return f"quantised: CI narrower than one test image ({quantum:.1f} pts)"
    if p_adjusted < ALPHA:
        return SIGNIFICANT[0] if x.mean() > 0 else SIGNIFICANT[1]
    return WITHIN_NOISE

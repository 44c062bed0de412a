"""Small statistics for evaluations: binomial intervals and paired differences.

Greedy evaluation of a fixed problem set before and after training (or of two arms trained with the
same seed) gives paired 0/1 outcomes per problem; the paired interval is much narrower than the
difference of two independent binomial intervals because the problems' difficulty cancels.
"""

from __future__ import annotations

import math
from typing import Sequence


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# two-sided 95% quantiles of Student's t, df = 1..30 (larger df: the normal 1.96 + 2.4/df correction)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean); SE is NaN for fewer than 2 values."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    if n < 2:
        return m, math.nan
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def paired(arm: Sequence[float], base: Sequence[float]) -> dict[str, float]:
    """Seed-paired difference arm − base: mean, SE, 95% t interval (NaN with one seed)."""
    d = [a - b for a, b in zip(arm, base)]
    m, se = mean_se(d)
    half = t975(len(d) - 1) * se if len(d) >= 2 else math.nan
    return {"mean": m, "se": se, "ci_low": m - half, "ci_high": m + half, "half_width": half, "n_seeds": len(d)}


def paired_problems(arm: Sequence[Sequence[int]], base: Sequence[Sequence[int]]) -> dict[str, float]:
    """Problem-level paired difference: per problem the seed-averaged correctness difference, then
    the mean over problems with a normal 95% interval (evaluation-set noise only)."""
    seeds = len(arm)
    n = len(arm[0]) if seeds else 0
    if not n or any(len(a) != n for a in list(arm) + list(base)):
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "half_width": math.nan, "n_problems": n}
    per = [sum(arm[s][i] - base[s][i] for s in range(seeds)) / seeds for i in range(n)]
    return normal_interval(n, sum(per), sum(d * d for d in per))


def normal_interval(n: int, total: float, total_sq: float) -> dict[str, float]:
    """Mean of n values with a normal 95% interval, from their count, sum and sum of squares (so
    data-parallel processes can add up their shares first)."""
    if n == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "half_width": math.nan, "n_problems": 0}
    m = total / n
    var = max(total_sq - n * m * m, 0.0) / (n - 1) if n > 1 else math.nan
    half = 1.96 * math.sqrt(var / n)
    return {"mean": m, "ci_low": m - half, "ci_high": m + half, "half_width": half, "n_problems": n}


def t_interval(values: Sequence[float], low: float | None = None, high: float | None = None) -> dict[str, float]:
    """Mean of ``values`` with a 95% Student-t interval (mean ± t975(n − 1) · SE), clipped to
    ``[low, high]`` where given (e.g. [0, 1] for a mean of per-problem accuracies); NaN bounds
    for fewer than 2 values. Keys: mean, se, ci_low, ci_high, half_width, n."""
    m, se = mean_se(values)
    n = len(values)
    half = t975(n - 1) * se if n >= 2 else math.nan
    lo, hi = m - half, m + half
    if low is not None and not math.isnan(lo):
        lo = max(lo, low)
    if high is not None and not math.isnan(hi):
        hi = min(hi, high)
    return {"mean": m, "se": se, "ci_low": lo, "ci_high": hi, "half_width": half, "n": n}

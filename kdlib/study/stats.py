"""The statistics of a study's table: mean ± std over seeds, and paired differences with a 95 %
confidence interval, a paired t-test and (n ≥ 6) a Wilcoxon signed-rank test.

A distilled student and the baseline of the same seed share the initialization, the batch order
and the augmented views, so their difference is a paired sample: the test is on the per-seed
differences ``d_i = a_i − b_i``, not on two independent groups.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats

WILCOXON_MIN_N = 6  # below this the exact signed-rank test cannot reach p < 0.05 (2 / 2^5 = 0.0625)


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (ddof 1; 0 for one value) of ``n`` values."""

    n: int
    mean: float
    std: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def spread(values: Sequence[float]) -> Spread:
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return Spread(0, math.nan, math.nan)
    return Spread(int(x.size), float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0)


@dataclass(frozen=True)
class PairedDifference:
    """``a − b`` over paired samples.

    ``ci95 = mean ± t_{0.975, n−1} · std / √n`` (Student's t interval of the mean difference);
    ``p_t``: two-sided paired t-test, ``t = mean / (std / √n)`` with ``n − 1`` degrees of freedom
    (``scipy.stats.ttest_rel``); ``p_wilcoxon``: two-sided Wilcoxon signed-rank test on the
    differences (``scipy.stats.wilcoxon``, exact when it can be), only for ``n ≥ 6``. With ``n < 2``
    nothing but the mean is defined (NaN). When every difference is equal and non-zero, ``std`` is 0
    and ``t`` is infinite: ``p_t`` is 0; when all are 0 it is 1.
    """

    n: int
    mean: float
    std: float
    ci95_low: float
    ci95_high: float
    p_t: float
    p_wilcoxon: float | None

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.size} and {y.size}")
    d = x - y
    n = int(d.size)
    if n == 0:
        return PairedDifference(0, math.nan, math.nan, math.nan, math.nan, math.nan, None)
    mean = float(d.mean())
    if n < 2:
        return PairedDifference(n, mean, math.nan, math.nan, math.nan, math.nan, None)
    std = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    if std == 0.0:
        p_t = 1.0 if mean == 0.0 else 0.0
    else:
        p_t = float(stats.ttest_rel(x, y).pvalue)
    p_w = None
    if n >= WILCOXON_MIN_N:
        p_w = 1.0 if not np.any(d) else float(stats.wilcoxon(x, y).pvalue)
    return PairedDifference(n, mean, std, mean - half, mean + half, p_t, p_w)


@dataclass(frozen=True)
class GroupDifference:
    """``mean(a) − mean(b)`` of two independent groups, with Welch's unequal-variance t-test
    (``scipy.stats.ttest_ind(equal_var=False)``), two-sided."""

    n_a: int
    n_b: int
    difference: float
    p_welch: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def group_difference(a: Sequence[float], b: Sequence[float]) -> GroupDifference:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(x.mean() - y.mean()) if x.size and y.size else math.nan
    p = float(stats.ttest_ind(x, y, equal_var=False).pvalue) if x.size > 1 and y.size > 1 else math.nan
    return GroupDifference(int(x.size), int(y.size), diff, p)


@dataclass(frozen=True)
class Correlation:
    """Pearson's ``r`` of ``n`` pairs and the two-sided p-value of ``r = 0`` (``scipy.stats.pearsonr``)."""

    n: int
    r: float
    p: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def within_correlation(groups: Sequence[Sequence[tuple[float, float]]]) -> Correlation:
    """The repeated-measures correlation (Bakdash & Marusich, "Repeated Measures Correlation",
    Front. Psychol. 2017) of ``(x, y)`` points in groups: Pearson's r of the values centred on their
    group's means, tested with ``N − k − 1`` degrees of freedom (N points in k groups of two or more;
    a single-point group says nothing about the slope and is left out):
    ``t = r·√(df / (1 − r²))``, two-sided. It is the t-test of the common slope of ``y ~ group + x``
    (ANCOVA). Plain ``pearsonr`` on the centred values would count N − 2 degrees of freedom: with
    groups of two it finds r = ±1 "significant" from any data."""
    xs: list[float] = []
    ys: list[float] = []
    used = [np.asarray(g, dtype=float) for g in groups if len(g) >= 2]
    for g in used:
        xs.extend(g[:, 0] - g[:, 0].mean())
        ys.extend(g[:, 1] - g[:, 1].mean())
    a, b = np.asarray(xs), np.asarray(ys)
    df = a.size - len(used) - 1
    if df < 1 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return Correlation(int(a.size), math.nan, math.nan)
    r = float(np.clip(np.sum(a * b) / math.sqrt(np.sum(a * a) * np.sum(b * b)), -1.0, 1.0))
    if abs(r) == 1.0:
        return Correlation(int(a.size), r, 0.0)
    t = r * math.sqrt(df / (1.0 - r * r))
    return Correlation(int(a.size), r, float(2.0 * stats.t.sf(abs(t), df)))


def correlation(x: Sequence[float], y: Sequence[float]) -> Correlation:
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return Correlation(int(a.size), math.nan, math.nan)
    result = stats.pearsonr(a, b)
    return Correlation(int(a.size), float(result.statistic), float(result.pvalue))

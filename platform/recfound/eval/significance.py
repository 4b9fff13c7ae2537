"""Paired bootstrap intervals for the difference between two systems on one metric.

The dev slices are small (8 I2I anchors, 98 Q2I queries, 50 generative prompts per task), so a verdict decided by
a few hundredths is often the luck of which queries the split holds. Resampling the queries with replacement —
the same resample for both systems, since they answered the same queries — gives the spread of the difference;
an interval that excludes 0 is a difference the test set supports. The resampling and the percentile interval are
``scipy.stats.bootstrap``'s; a metric that is a mean over queries resamples the per-query values, a corpus metric
(macro-F1, BLEU) is recomputed on each resample of the prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import bootstrap

LEVEL = 0.95
RESAMPLES = 2000
Interval = tuple[float, float]


def interval(statistic: Callable[[np.ndarray], float], n: int, seed: int = 0) -> Interval:
    """The ``LEVEL`` percentile interval of ``statistic(indices)`` over resamples of ``n`` query indices; nan
    bounds with fewer than 2 queries."""
    if n < 2:
        return float("nan"), float("nan")
    result = bootstrap(
        (np.arange(n),),
        statistic,
        vectorized=False,
        n_resamples=RESAMPLES,
        confidence_level=LEVEL,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def mean_difference(a: Sequence[float | None], b: Sequence[float | None], seed: int = 0) -> Interval:
    """Interval of mean(a) − mean(b) over the queries where both are defined (None or nan: a query without
    positives, undefined for every system alike)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired values need the same queries: {x.size} vs {y.size}")
    diff = (x - y)[~(np.isnan(x) | np.isnan(y))]
    return interval(lambda idx: float(diff[idx].mean()), diff.size, seed)


def metric_difference(
    metric: Callable[[Sequence[str], Sequence[str]], float],
    runs: Sequence[Sequence[str]],
    baselines: Sequence[Sequence[str]],
    refs: Sequence[str],
    seed: int = 0,
) -> Interval:
    """Interval of metric(run, refs) − metric(baseline, refs), recomputed on each resample of the prompts; with
    several runs on a side (training seeds answering the same prompts) that side's mean metric."""
    sides = (*runs, *baselines)
    if any(len(answers) != len(refs) for answers in sides) or not runs or not baselines:
        raise ValueError(f"paired answers need the same prompts: {[len(a) for a in sides]} vs {len(refs)}")
    ours, theirs = ([np.asarray(list(a), dtype=object) for a in side] for side in (runs, baselines))
    r = np.asarray(list(refs), dtype=object)

    def difference(idx: np.ndarray) -> float:
        references = list(r[idx])
        mean = lambda side: sum(metric(list(a[idx]), references) for a in side) / len(side)  # noqa: E731
        return mean(ours) - mean(theirs)

    return interval(difference, len(r), seed)


def settled(bounds: Interval) -> bool:
    """Whether the interval excludes 0: the sign of the difference is supported by the test set."""
    low, high = bounds
    return bool(low > 0 or high < 0)

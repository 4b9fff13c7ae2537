"""Turn per-task weights into per-task sample counts for one batch.

S2Sched weights choose samples, they never weight the loss, so the only place they touch a batch is here: a
candidate pool is cut down to ``total`` samples split across a group's tasks by weight (``allocate``), and a
step's batch is split across a mode's tasks with fractions carried to later steps (``Sampler``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def _largest_remainder(weights: Mapping[str, float], total: int) -> dict[str, int]:
    """Hamilton apportionment: floor of each quota, leftover units to the largest fractions.

    Ties go to the task listed first, so every worker computes the same split from the same weights; fractions
    are compared rounded to 1e-9 so float noise (67.4999… vs 22.5000…) does not break a mathematical tie.
    Tasks whose weights are all zero share ``total`` equally rather than receiving nothing.
    """
    mass = sum(weights.values())
    if mass <= 0:
        weights, mass = dict.fromkeys(weights, 1.0), float(len(weights))
    quotas = {t: w / mass * total for t, w in weights.items()}
    counts = {t: math.floor(q) for t, q in quotas.items()}
    leftover = total - sum(counts.values())
    order = sorted(enumerate(quotas), key=lambda it: (-round(quotas[it[1]] - counts[it[1]], 9), it[0]))
    for _, task in order[:leftover]:
        counts[task] += 1
    return counts


def allocate(weights: Mapping[str, float], total: int, available: Mapping[str, int] | None = None) -> dict[str, int]:
    """Split ``total`` samples across tasks in proportion to ``weights``.

    Rounding is largest-remainder (ties by the order of ``weights``). A task asking for more than ``available``
    gets what it has; its shortfall goes to the remaining tasks by weight, repeated until nothing is capped.
    The result sums to ``total`` whenever the tasks have that many samples in all, else to what exists.
    Tasks missing from ``available`` are treated as having no samples.
    """
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    for task, w in weights.items():
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight of task {task!r} must be finite and >= 0, got {w}")
    caps = {t: total if available is None else max(0, int(available.get(t, 0))) for t in weights}
    counts = dict.fromkeys(weights, 0)
    open_tasks = [t for t in weights if caps[t] > 0]
    remaining = total
    while remaining > 0 and open_tasks:
        share = _largest_remainder({t: weights[t] for t in open_tasks}, remaining)
        capped = [t for t in open_tasks if share[t] > caps[t]]
        if not capped:
            for t in open_tasks:
                counts[t] = share[t]
            break
        for t in capped:
            counts[t] = caps[t]
            remaining -= caps[t]
            open_tasks.remove(t)
    return counts


class Sampler:
    """Per-step sample counts from the schedule's weights, carrying fractional quotas to later steps.

    Largest-remainder rounding of one step alone would never give a task with weight x batch < 0.5 a sample; the
    carried remainder gives every task its share over time while each step still sums to the batch size.
    """

    def __init__(self, tasks: list[str], total: int) -> None:
        self.tasks, self.total = tasks, total
        self.carry = {t: 0.0 for t in tasks}

    def counts(self, weights: dict[str, float]) -> dict[str, int]:
        if not self.tasks or not self.total:
            return {}
        norm = sum(weights[t] for t in self.tasks)
        quota = {t: weights[t] / norm * self.total + self.carry[t] for t in self.tasks}
        positive = {t: max(q, 0.0) for t, q in quota.items()}
        counts = allocate({t: q / sum(positive.values()) for t, q in positive.items()}, self.total)
        self.carry = {t: quota[t] - counts[t] for t in self.tasks}
        return counts

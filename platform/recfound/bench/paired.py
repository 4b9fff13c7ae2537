"""Two trainings of the recipe compared metric by metric over the same seeds: the ablation benchmark's variant
against the recipe, and the quality benchmark's merged model against the final checkpoint it was merged from.

Each side enters as its mean over the seeds; the difference carries the paired bootstrap interval over the test
queries (each side its per-query mean over the seeds, ``Evidence.interval``), so a change is judged by what the
test set supports rather than by a point estimate.
"""

from __future__ import annotations

from typing import Any

from recfound.bench.common import Table, fmt
from recfound.bench.verdicts import Evidence, Scores, mean_over_seeds, targets
from recfound.eval.significance import settled


def paired_rows(evidence: Evidence, base: str, other: str, runs: dict[str, list[Scores]]) -> list[dict[str, Any]]:
    """Per (task, metric) of the quality comparisons that both sides measured: each side's mean and standard
    deviation over its seeds (``runs``), ``other`` − ``base`` and the interval of that difference."""
    (a_mean, a_sd), (b_mean, b_sd) = mean_over_seeds(runs[base]), mean_over_seeds(runs[other])
    rows = []
    for task, metric, _ in targets(a_mean):
        a, b = a_mean.get(task, {}).get(metric), b_mean.get(task, {}).get(metric)
        if a is None or b is None:
            continue
        bounds = evidence.interval(other, base, task, metric)
        rows.append(
            {
                "task": task,
                "metric": metric,
                base: a,
                f"{base}_sd": a_sd[task][metric],
                other: b,
                f"{other}_sd": b_sd[task][metric],
                "difference": b - a,
                "interval": bounds,
                "settled": None if bounds is None else settled(bounds),
            }
        )
    return rows


def tally(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many differences are positive / negative, and how many of those the interval settles."""
    return {
        "better": sum(r["difference"] > 0 for r in rows),
        "worse": sum(r["difference"] < 0 for r in rows),
        "settled_better": sum(r["difference"] > 0 and bool(r["settled"]) for r in rows),
        "settled_worse": sum(r["difference"] < 0 and bool(r["settled"]) for r in rows),
    }


def summary(other: str, rows: list[dict[str, Any]]) -> str:
    counts = tally(rows)
    return (
        f"{other}: better on {counts['better']} of {len(rows)} ({counts['settled_better']} settled), worse on "
        f"{counts['worse']} ({counts['settled_worse']} settled)"
    )


def _verdict(row: dict[str, Any]) -> str:
    """ "better"/"worse"/"same" for the second side, marked "(n.s.)" when the interval includes 0."""
    word = "better" if row["difference"] > 0 else "worse" if row["difference"] < 0 else "same"
    return word + ("" if row["settled"] is not False or word == "same" else " (n.s.)")


def paired_table(title: str, rows: list[dict[str, Any]], base: str, other: str, seeds: int) -> Table:
    """``rows`` as a table: each side (mean ± sd when over several seeds), the difference, its interval, and the
    second side's verdict."""
    several = seeds > 1
    spread = lambda value, sd: fmt(value) + (f" ± {fmt(sd)}" if several else "")  # noqa: E731
    body = [
        [
            r["task"],
            r["metric"],
            spread(r[base], r[f"{base}_sd"]),
            spread(r[other], r[f"{other}_sd"]),
            f"{r['difference']:+.3f}",
            "-" if r["interval"] is None else f"[{r['interval'][0]:+.3f}, {r['interval'][1]:+.3f}]",
            _verdict(r),
        ]
        for r in rows
    ]
    mean = " (mean ± sd)" if several else ""
    return Table(title, ["task", "metric", base + mean, other + mean, "difference", "95% CI", "verdict"], body)

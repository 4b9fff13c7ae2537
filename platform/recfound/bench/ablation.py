"""Ablation benchmark: the quality recipe against one variant of it, trained with the same seeds, each evaluated
without baselines; per (task, metric) of the quality benchmark's comparisons, the variant's difference from the
recipe with its paired bootstrap interval over the test queries (each side its mean over the seeds).

One row of docs/evaluation.md's ablation table per run. The recipe's runs and evaluations share the quality
benchmark's layout, so an ``out`` the quality benchmark filled (same recipe, overrides and seeds) is reused and only
the variant is trained.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from recfound.bench.common import Report, Table
from recfound.bench.paired import paired_rows, paired_table, summary, tally
from recfound.bench.quality import RecipeRuns, evaluate_once, train_recipe, trained_tasks
from recfound.bench.verdicts import Evidence, Scores

RECIPE = "recipe"


class AblationBench(RecipeRuns):
    """Train the quality recipe and a variant of it with the same seeds, evaluate both (no baselines), and print
    per (task, metric) the variant's difference from the recipe with its paired 95% interval. Arguments as
    key=value or --key value."""

    variant: list[str] = Field(min_length=1)
    """What the variant changes, as variant.<key>=value on the command line (e.g. 'variant.loss.logq_tasks=[]');
    applied after the train.<key>=value overrides, which both runs get."""
    name: str = "variant"
    """The variant's name: its runs are train/<recipe>-<name>[-seed<k>], its evaluations eval-<name>[-seed<k>]."""
    out: str = "runs/bench/ablation"
    """Directory for the runs and evaluations (the quality benchmark's layout: pointing it at a quality benchmark's
    out reuses that benchmark's runs of the recipe) and this report (ablation.json)."""

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name == RECIPE:
            raise ValueError(
                f"name must be letters, digits, '_', '.', '-' (a directory name), not {RECIPE!r}: {name!r}"
            )
        return name

    def overrides(self) -> list[str]:
        return [*self.train, *self.variant]  # the variant's: the recipe's, then the change


def _arm(
    bench: AblationBench, out: Path, seed: int, label: str, overrides: list[str]
) -> tuple[str, Path, dict[str, Any]]:
    """Train (or reuse) and evaluate one side's run for ``seed``: its checkpoint, evaluation folder and results
    (scores, and the run's convergence read from its metrics.jsonl)."""
    suffix = ("" if not label else f"-{label}") + bench.suffix(seed)
    final = train_recipe(bench.config, bench.data, out / "train", Path(bench.config).stem + suffix, seed, overrides)
    folder = out / f"eval{suffix}"
    cfg = bench.evaluation(final, folder, "none", trained_tasks(final, bench.data, bench.split))
    return final, folder, evaluate_once(cfg)


def run(bench: AblationBench) -> Report:
    out = Path(bench.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    arms = {RECIPE: ("", bench.train), bench.name: (bench.name, bench.overrides())}
    evidence = Evidence()
    runs: dict[str, list[Scores]] = {arm: [] for arm in arms}
    convergence: dict[str, list[dict[str, Any] | None]] = {arm: [] for arm in arms}
    checkpoints: dict[str, list[str]] = {arm: [] for arm in arms}
    for seed in bench.seeds:
        for arm, (label, overrides) in arms.items():
            final, folder, results = _arm(bench, out, seed, label, overrides)
            evidence.add_evaluation(folder, {"recfound": arm})
            runs[arm].append(results["systems"]["recfound"])
            convergence[arm].append(results.get("convergence"))
            checkpoints[arm].append(final)
    rows = paired_rows(evidence, RECIPE, bench.name, runs)
    return _report(bench, rows, runs, convergence, checkpoints, time.perf_counter() - began)


def _training_table(convergence: dict[str, list[dict[str, Any] | None]]) -> list[Table]:
    """Per task, the rows each side trained on (mean over seeds) and the step at which its loss reached the
    convergence target, seed by seed: what a change of the task mix (S2Sched vs uniform) does to training, beside
    what it does to the test metrics. Empty when a run's history was not found."""
    if any(c is None for runs in convergence.values() for c in runs):
        return []
    arms, first = list(convergence), convergence[RECIPE][0]
    tasks = [t for t in first["tasks"] if all(t in c["tasks"] for cs in convergence.values() for c in cs)]

    def rows(arm: str, task: str) -> str:
        counts = [c["tasks"][task]["rows"] for c in convergence[arm]]
        return "-" if None in counts else f"{sum(counts) / len(counts):.0f}"

    def steps(arm: str, task: str) -> str:
        return " / ".join("-" if (s := c["tasks"][task]["step"]) is None else str(s) for c in convergence[arm])

    def last(arm: str) -> str:
        return " / ".join(
            f"{c['balance']['converged']}/{c['balance']['total']} by {c['balance']['last'] or '-'}"
            for c in convergence[arm]
        )

    body = [[t, *(rows(a, t) for a in arms), *(steps(a, t) for a in arms)] for t in tasks]
    body.append(["(tasks reaching it, by step)", *("" for _ in arms), *(last(a) for a in arms)])
    return [
        Table(
            f"Training per task: rows trained (mean over seeds) and the step at which the trailing mean of "
            f"{first['window']} losses first reached {first['target']} x the initial, per seed (-: never)",
            ["task", *(f"rows {a}" for a in arms), *(f"step {a}" for a in arms)],
            body,
        )
    ]


def _report(
    bench: AblationBench,
    rows: list[dict[str, Any]],
    runs: dict[str, list[Scores]],
    convergence: dict[str, list[dict[str, Any] | None]],
    checkpoints: dict[str, list[str]],
    seconds: float,
) -> Report:
    counts = tally(rows)
    report = Report(
        "ablation",
        bench.model_dump(mode="json") | {"checkpoints": checkpoints},
        ratios={"better_share": counts["better"] / max(1, len(rows))},
        figures={
            "rows": rows,
            **counts,
            "comparisons": len(rows),
            "seconds": seconds,
            "per_seed": runs,
            "convergence": convergence,
        },
        tables=[
            paired_table(
                f"{bench.name} ({' '.join(bench.variant)}) vs the recipe on {bench.split} ({Path(bench.data).name}, "
                f"seeds {bench.seeds}); higher is better; (n.s.): the paired interval of the difference includes 0",
                rows,
                RECIPE,
                bench.name,
                len(bench.seeds),
            ),
            *_training_table(convergence),
        ],
    )
    report.notes.append(f"{summary(bench.name, rows)} | {seconds / 60:.1f} min")
    return report

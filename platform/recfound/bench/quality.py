"""Quality benchmark: train a recipe (once per seed), evaluate it (and its Model Merge) with every baseline, and
give a verdict per (task, metric, baseline) (bench/verdicts.py: which comparisons, and the interval of each
difference). Every figure comes from jobs/evaluate.py's own results, run here with the same code a user runs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from recfound.bench.common import CONFIG_DIR, Report, Table, fmt
from recfound.bench.paired import paired_rows, paired_table, summary, tally
from recfound.bench.verdicts import (
    Evidence,
    Scores,
    add_majority,
    majority_answers,
    mean_over_seeds,
    verdict_cell,
    verdicts,
)
from recfound.config import CommaList, Config, load_config
from recfound.eval.config import EvalConfig
from recfound.eval.runner import MODEL, PER_QUERY, RESULTS, Dataset, evaluate
from recfound.eval.systems import resolve_model
from recfound.merge.artifact import MergeConfig, merge_checkpoints
from recfound.train.config import TrainConfig

MERGED = "merged"
RUN_KEYS = ("data", "storage_path", "name", "seed")
"""What train_recipe sets for each run, in its argument order; refused as the user's overrides."""


class RecipeRuns(Config):
    """What the quality and ablation benchmarks share: a recipe trained once per seed on a built dataset, each run
    evaluated on one split."""

    data: str
    """Built dataset directory (jobs/build_dataset.py out)."""
    config: str = str(CONFIG_DIR / "quality.yaml")
    """Training recipe (a jobs/train.py YAML); its max_steps and data sizes decide the time."""
    train: list[str] = []
    """Overrides of the training config, as train.<key>=value on the command line (e.g. train.max_steps=100); not
    data, storage_path, name or seed, which the benchmark sets for each run."""
    max_rows_per_task: int = Field(50, ge=0)
    """Generative prompts decoded per task and system (greedy decoding dominates evaluation time on CPU)."""
    max_new_tokens: int = Field(48, ge=1)
    """Most tokens generated per prompt (answers of the classification tasks take 1-3)."""
    split: str = "test"
    """Split the figures are taken on."""
    seeds: CommaList[int] = [0]
    """Training seeds, one run of the recipe each (the first in train/<recipe>, the others in
    train/<recipe>-seed<k>); with several, a model's figure is its mean over the seeds, shown with their standard
    deviation. Each seed costs a whole training and evaluation of each model the benchmark trains."""

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be one or more distinct integers, got {seeds}")
        return seeds

    def overrides(self) -> list[str]:
        """Every override some run of the benchmark applies to the recipe."""
        return self.train

    @model_validator(mode="after")
    def _recipe_loads(self) -> RecipeRuns:
        """Load the recipe with its overrides now, so that a mistyped key fails before the first of several
        training runs rather than after it (ConfigError, naming the key). The keys each run gets from the
        benchmark are refused: an override of its seed or name would make every seed (or both arms) one run."""
        for item in self.overrides():
            key = item.partition("=")[0]
            if key in RUN_KEYS:
                raise ValueError(f"{key}: set by the benchmark for each run (seeds=, data=, out=), not by an override")
        load_config(TrainConfig, self.config, [f"data={self.data}", *self.overrides()])
        return self

    def suffix(self, seed: int) -> str:
        """A seed's suffix of run and evaluation names: none for the first seed."""
        return "" if seed == self.seeds[0] else f"-seed{seed}"

    def evaluation(self, model: str, out: Path, baselines: str, tasks: list[str]) -> EvalConfig:
        """How each model is evaluated (``tasks``: ``trained_tasks`` of its run)."""
        return EvalConfig(
            model=model,
            data=self.data,
            out=str(out),
            split=self.split,
            max_rows_per_task=self.max_rows_per_task,
            max_new_tokens=self.max_new_tokens,
            tasks=tasks,
            baselines=baselines,
        )


class QualityBench(RecipeRuns):
    """Train the quality recipe on a built dataset, evaluate the final and the merged model with every baseline,
    and print a win/lose verdict per (task, metric, baseline). Arguments as key=value or --key value."""

    out: str = "runs/bench/quality"
    """Directory for the training run (train/), the evaluations (eval/, eval-merged/), the merged model and this
    report (quality.json). Re-running with the same out resumes or reuses the finished training runs and reuses
    finished evaluations run with the same settings."""
    merge: bool = True
    """Also merge the run's last two checkpoints (TIES, as the paper), give the merged model its verdicts and compare
    it with the final checkpoint, metric by metric, paired (with vs without Model Merge)."""


def train_recipe(config: str, data: str, storage: Path, name: str, seed: int, overrides: list[str]) -> str:
    """The final checkpoint of run ``name`` of the recipe ``config`` (with ``overrides``) in ``storage``: trained,
    resumed, or (finished before) returned as it is."""
    import ray

    from recfound.train.run import run

    per_run = zip(RUN_KEYS, (data, storage, name, seed), strict=True)
    overrides = [f"{key}={value}" for key, value in per_run] + overrides
    cfg = load_config(TrainConfig, config, overrides)
    ours = not ray.is_initialized()
    try:
        return run(cfg)
    finally:
        if ours:
            ray.shutdown()  # evaluation gets the cores back


def _merge(final: str, out: Path) -> str | None:
    kept = sorted(p.parent for p in Path(final).parent.glob("checkpoint_*/checkpoint.json"))[-2:]
    if len(kept) < 2:
        return None
    return str(merge_checkpoints(MergeConfig(checkpoints=[str(p) for p in kept], out=str(out))))


def trained_tasks(checkpoint: str, data: str, split: str) -> list[str]:
    """The tasks the run trained that the split has rows for: a recipe may train a subset of the dataset."""
    dataset = Dataset.load(data)
    return [t for t in resolve_model(checkpoint).trained_tasks or () if dataset.count(t, split)]


def evaluate_once(cfg: EvalConfig) -> dict[str, Any]:
    """The evaluation in ``cfg.out`` when one finished there with this very config (model path included), else a
    new one: a re-run with one more seed, or after a crash, pays only for what is missing. per_query.json is
    written last, so a torn evaluation is run again."""
    folder = Path(cfg.out)
    if (folder / PER_QUERY).is_file():
        previous = json.loads((folder / RESULTS).read_text())
        if _serves(previous.get("config") or {}, cfg.model_dump(mode="json")):
            return previous
    return evaluate(cfg)


def _serves(previous: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether an evaluation run with config ``previous`` answers one asked with ``wanted``: the same settings,
    baselines aside, and every baseline asked for among those it ran (an ablation reuses the quality benchmark's
    evaluation that also ran every baseline; the model's own figures do not depend on them)."""
    strip = lambda config: {k: v for k, v in config.items() if k != "baselines"}  # noqa: E731
    return strip(previous) == strip(wanted) and set(wanted["baselines"]) <= set(previous.get("baselines", []))


@dataclass
class Seeded:
    """One seed's run: its final checkpoint, merged model and the scores of each."""

    seed: int
    checkpoint: str
    merged: str | None
    scores: dict[str, Scores]


def _run_seed(bench: QualityBench, out: Path, seed: int, evidence: Evidence, systems: dict[str, Scores]) -> Seeded:
    """Train and evaluate one seed; the first seed's evaluation also runs every baseline (they do not depend on
    the training seed) into ``systems``."""
    first = seed == bench.seeds[0]
    suffix = bench.suffix(seed)
    final = train_recipe(bench.config, bench.data, out / "train", Path(bench.config).stem + suffix, seed, bench.train)
    tasks = trained_tasks(final, bench.data, bench.split)
    folder = out / f"eval{suffix}"
    results = evaluate_once(bench.evaluation(final, folder, "all" if first else "none", tasks))
    evidence.add_evaluation(folder)
    scores = {"recfound": results["systems"]["recfound"]}
    if first:
        systems |= {k: v for k, v in results["systems"].items() if k != "recfound"}
    merged = _merge(final, out / f"{MERGED}{suffix}") if bench.merge else None
    if merged is not None:
        folder = out / f"eval-{MERGED}{suffix}"
        merged_results = evaluate_once(bench.evaluation(merged, folder, "none", tasks))
        evidence.add_evaluation(folder, {"recfound": MERGED})
        scores[MERGED] = merged_results["systems"]["recfound"]
    return Seeded(seed, final, merged, scores)


def run(bench: QualityBench) -> Report:
    out = Path(bench.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    evidence, systems = Evidence(), {}
    runs = [_run_seed(bench, out, seed, evidence, systems) for seed in bench.seeds]
    models = list(runs[0].scores)
    spreads = {}
    for model in models:
        systems[model], spreads[model] = mean_over_seeds([r.scores[model] for r in runs])
    add_majority(systems, evidence, majority_answers(bench.data, list(systems["recfound"])))
    rows = verdicts(systems, models, evidence)
    finished = time.perf_counter()

    wins = {m: sum(bool(r[f"{m}_wins"]) for r in rows) for m in models}
    settled_wins = {m: sum(bool(r[f"{m}_wins"] and r[f"{m}_settled"]) for r in rows) for m in models}
    settled_losses = {m: sum(r[f"{m}_wins"] is False and bool(r[f"{m}_settled"]) for r in rows) for m in models}
    several = len(runs) > 1
    headers = ["task", "metric", "baseline", "baseline value"]
    headers += [h for m in models for h in (m + (" (mean ± sd)" if several else ""), "95% CI of difference", "verdict")]
    table = []
    for r in rows:
        cells = [r["task"], r["metric"], r["baseline"], fmt(r["baseline_value"])]
        for m in models:
            sd = spreads[m].get(r["task"], {}).get(r["metric"])
            bounds = r[f"{m}_interval"]
            cells += [
                fmt(r[m]) + (f" ± {fmt(sd)}" if several and sd is not None else ""),
                "-" if bounds is None else f"[{bounds[0]:+.3f}, {bounds[1]:+.3f}]",
                verdict_cell(r[f"{m}_wins"], r[f"{m}_settled"]),
            ]
        table.append(cells)
    report = Report(
        "quality",
        bench.model_dump(mode="json")
        | {"checkpoints": [r.checkpoint for r in runs], "merged": [r.merged for r in runs]},
        ratios={f"{m}_win_share": wins[m] / max(1, len(rows)) for m in models},
        figures={
            "verdicts": rows,
            "wins": wins,
            "settled_wins": settled_wins,
            "settled_losses": settled_losses,
            "comparisons": len(rows),
            "seconds": finished - began,
            "systems": systems,
            "spread_over_seeds": spreads if several else None,
            "per_seed": {r.seed: r.scores for r in runs},
        },
        tables=[
            Table(
                f"Verdicts on {bench.split} ({Path(bench.data).name}, seeds {bench.seeds}): model vs baseline, higher"
                " is better; (n.s.): the paired bootstrap interval of the difference includes 0",
                headers,
                table,
            )
        ],
    )
    report.notes.append(
        " | ".join(
            f"{m}: {wins[m]} of {len(rows)} won ({settled_wins[m]} settled), {settled_losses[m]} settled losses"
            for m in models
        )
        + f" | {(finished - began) / 60:.1f} min | results: {out / 'eval' / RESULTS}"
    )
    if MERGED in models:
        _add_merge_ablation(report, bench, runs, evidence)
    return report


def _add_merge_ablation(report: Report, bench: QualityBench, runs: list[Seeded], evidence: Evidence) -> None:
    """With vs without Model Merge: the merged model against the final checkpoint it was merged from, per
    metric, paired over the test queries and the seeds (the ablation benchmark's table)."""
    sides = {MODEL: [r.scores[MODEL] for r in runs], MERGED: [r.scores[MERGED] for r in runs]}
    rows = paired_rows(evidence, MODEL, MERGED, sides)
    report.figures["merged_vs_final"] = {"rows": rows, **tally(rows)}
    title = (
        f"The merged model vs the final checkpoint on {bench.split} ({Path(bench.data).name}, seeds {bench.seeds});"
        " higher is better; (n.s.): the paired interval of the difference includes 0"
    )
    report.tables.append(paired_table(title, rows, MODEL, MERGED, len(runs)))
    report.notes.append(summary(MERGED, rows))

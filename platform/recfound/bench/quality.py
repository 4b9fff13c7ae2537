"""Quality benchmark: train a recipe, evaluate it (and its Model Merge) with every baseline, and give a verdict.

The verdicts are the issue's targets, one per (task, metric, baseline): U2I and I2I against popularity, BM25,
item-CF and zero-shot MiniLM on the paper's pools and the full catalogue; Q2I against BM25 and MiniLM;
classification-style generative tasks against the majority answer of the training split and the untrained
backbone; free-text tasks against the untrained backbone; candidate_ranking's list metrics also against every
retrieval baseline (the issue's target: NDCG@10 over candidate lists above popularity and item-CF). Every figure
comes from jobs/evaluate.py's own results.json, run here with the same code a user runs.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import Field

from recfound.bench.common import CONFIG_DIR, Report, Table, fmt
from recfound.config import Config, load_config
from recfound.eval.config import EvalConfig
from recfound.eval.metrics import GENERATIVE_METRICS, metric_name
from recfound.eval.protocols import LIST_PROTOCOLS, list_metric_names
from recfound.eval.runner import RESULTS, Dataset, evaluate, generative_sample
from recfound.eval.systems import resolve_model
from recfound.merge.artifact import MergeConfig, merge_checkpoints
from recfound.tasks import EMBEDDING_TASKS
from recfound.train.config import TrainConfig

RETRIEVAL = ["popularity", "bm25", "item_cf", "minilm"]
EMBEDDING_TARGETS: list[tuple[str, str, list[str]]] = [
    ("u2i", "pool.mrr@20", RETRIEVAL),
    ("u2i", "full.ndcg@10", RETRIEVAL),
    ("i2i", "pool.ndcg@20", RETRIEVAL),
    ("i2i", "full.ndcg@10", RETRIEVAL),
    ("q2i", "pool.mrr@20", ["bm25", "minilm"]),
    ("q2i", "full.ndcg@10", ["bm25", "minilm"]),
]
CLASSIFICATION = {
    "sentiment_analysis",
    "product_relation_prediction",
    "product_matching",
    "sequential_recommendation",
    "answerability_prediction",
    "candidate_ranking",
}
"""Generative tasks with a fixed answer set: they must also beat always answering the training split's mode."""
MAJORITY, MERGED = "majority", "merged"


class QualityBench(Config):
    """Train the quality recipe on a built dataset, evaluate the final and the merged model with every baseline,
    and print a win/lose verdict per (task, metric, baseline). Arguments as key=value or --key value."""

    data: str
    """Built dataset directory (jobs/build_dataset.py out)."""
    out: str = "runs/bench/quality"
    """Directory for the training run (train/), the evaluations (eval/, eval-merged/), the merged model and this
    report (quality.json). Re-running with the same out resumes or reuses the finished training run."""
    config: str = str(CONFIG_DIR / "quality.yaml")
    """Training recipe (a jobs/train.py YAML); its max_steps and data sizes decide the time."""
    train: list[str] = []
    """Overrides of the training config, as train.<key>=value on the command line (e.g. train.max_steps=100)."""
    merge: bool = True
    """Also merge the run's last two checkpoints (TIES, as the paper) and give the merged model its verdicts."""
    max_rows_per_task: int = Field(50, ge=0)
    """Generative prompts decoded per task and system (greedy decoding dominates evaluation time on CPU)."""
    max_new_tokens: int = Field(48, ge=1)
    """Most tokens generated per prompt (answers of the classification tasks take 1-3)."""
    split: str = "test"
    """Split the verdicts are taken on."""


def _train(bench: QualityBench, out: Path) -> str:
    import ray

    from recfound.train.run import run

    overrides = [f"data={bench.data}", f"storage_path={out / 'train'}", f"name={Path(bench.config).stem}", *bench.train]
    cfg = load_config(TrainConfig, bench.config, overrides)
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
    return str(merge_checkpoints(MergeConfig(checkpoints=[str(p) for p in kept], out=str(out / MERGED))))


def trained_tasks(checkpoint: str, data: str, split: str) -> list[str]:
    """The tasks the run trained that the split has rows for: a recipe may train a subset of the dataset."""
    dataset = Dataset.load(data)
    return [t for t in resolve_model(checkpoint).trained_tasks or () if dataset.count(t, split)]


def majority_scores(data: str, split: str, tasks: list[str], rows: int, seed: int) -> dict[str, dict[str, float]]:
    """Each classification task's metric when every answer is the training split's most frequent response, on
    the same seeded sample the evaluator decodes."""
    dataset = Dataset.load(data)
    out = {}
    for task in tasks:
        if task not in CLASSIFICATION or not dataset.count(task, "train") or not dataset.count(task, split):
            continue
        answer = Counter(dataset.rows(task, "train", ["response"])["response"]).most_common(1)[0][0]
        references = generative_sample(dataset, task, split, rows, seed)["response"].tolist()
        out[task] = {metric_name(m): m([answer] * len(references), references) for m in GENERATIVE_METRICS[task]}
    return out


def verdicts(systems: dict[str, dict[str, dict[str, float | None]]], models: list[str]) -> list[dict[str, Any]]:
    """One row per (task, metric, baseline) that both sides measured: the baseline's value, each model's value
    and whether it wins (strictly higher)."""
    targets = list(EMBEDDING_TARGETS)
    reference = systems[models[0]]
    for task in sorted(t for t in reference if t not in EMBEDDING_TASKS):
        baselines = [MAJORITY, "backbone"] if task in CLASSIFICATION else ["backbone"]
        ranked = list_metric_names(task) if task in LIST_PROTOCOLS else ()
        targets += [(task, metric, baselines + (RETRIEVAL if metric in ranked else [])) for metric in reference[task]]
    rows = []
    for task, metric, baselines in targets:
        for baseline in baselines:
            base = systems.get(baseline, {}).get(task, {}).get(metric)
            if base is None or reference.get(task, {}).get(metric) is None:
                continue
            row: dict[str, Any] = {"task": task, "metric": metric, "baseline": baseline, "baseline_value": base}
            for model in models:
                value = systems[model].get(task, {}).get(metric)
                row[model] = value
                row[f"{model}_wins"] = None if value is None else value > base
            rows.append(row)
    return rows


def run(bench: QualityBench) -> Report:
    out = Path(bench.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    final = _train(bench, out)
    trained = time.perf_counter()
    common = {
        "data": bench.data,
        "split": bench.split,
        "max_rows_per_task": bench.max_rows_per_task,
        "max_new_tokens": bench.max_new_tokens,
        "tasks": trained_tasks(final, bench.data, bench.split),
    }
    results = evaluate(EvalConfig(model=final, out=str(out / "eval"), baselines="all", **common))
    systems = dict(results["systems"])
    models = ["recfound"]
    merged = _merge(final, out) if bench.merge else None
    if merged is not None:
        systems[MERGED] = evaluate(EvalConfig(model=merged, out=str(out / "eval-merged"), baselines="none", **common))[
            "systems"
        ]["recfound"]
        models.append(MERGED)
    systems[MAJORITY] = majority_scores(
        bench.data,
        bench.split,
        list(systems["recfound"]),
        bench.max_rows_per_task,
        EvalConfig.model_fields["seed"].default,
    )
    rows = verdicts(systems, models)
    finished = time.perf_counter()

    wins = {m: sum(bool(r[f"{m}_wins"]) for r in rows) for m in models}
    headers = ["task", "metric", "baseline", "baseline value"] + [h for m in models for h in (m, "verdict")]
    table = [
        [r["task"], r["metric"], r["baseline"], fmt(r["baseline_value"])]
        + [c for m in models for c in (fmt(r[m]), {True: "win", False: "LOSE", None: "-"}[r[f"{m}_wins"]])]
        for r in rows
    ]
    report = Report(
        "quality",
        bench.model_dump(mode="json") | {"checkpoint": final, "merged": merged},
        ratios={f"{m}_win_share": wins[m] / max(1, len(rows)) for m in models},
        figures={
            "verdicts": rows,
            "wins": wins,
            "comparisons": len(rows),
            "train_seconds": trained - began,
            "eval_seconds": finished - trained,
            "total_seconds": finished - began,
            "systems": systems,
        },
        tables=[
            Table(
                f"Verdicts on {bench.split} ({Path(bench.data).name}): model vs baseline, higher is better",
                headers,
                table,
            )
        ],
    )
    report.notes.append(
        " | ".join(f"{m}: {wins[m]} of {len(rows)} won" for m in models)
        + f" | train {(trained - began) / 60:.1f} min, evaluation {(finished - trained) / 60:.1f} min"
        + f" | results: {out / 'eval' / RESULTS}"
    )
    return report

"""The quality benchmark's verdicts: which baselines each model is compared with, on which metrics, whether it
wins, and whether the test set supports the difference.

The targets are issue 13's, one per (task, metric, baseline): U2I and I2I against popularity, BM25, item-CF and
zero-shot MiniLM on the paper's pools and the full catalogue; Q2I against BM25 and MiniLM; classification-style
generative tasks against the majority answer of the training split and the untrained backbone; free-text tasks
against the untrained backbone; candidate_ranking's list metrics also against every retrieval baseline.

A model trained with several seeds enters as the mean over its seeds (per query, and per metric), so the verdict
is on the recipe rather than on one draw; each verdict carries the paired bootstrap interval of the difference
(eval/significance.py) over the test queries.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recfound.eval.metrics import GENERATIVE_METRICS, metric_name
from recfound.eval.protocols import LIST_PROTOCOLS, list_metric_names
from recfound.eval.runner import PER_QUERY, PREDICTIONS, Dataset
from recfound.eval.significance import Interval, mean_difference, metric_difference, settled
from recfound.tasks import EMBEDDING_TASKS

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
MAJORITY = "majority"

Scores = dict[str, dict[str, float | None]]
"""{task: {metric: value}} of one system."""


@dataclass
class Evidence:
    """What the intervals resample: per-query values (embedding and list metrics) and generated answers with their
    references (generative metrics), per system; a model's entries hold one answer list per seed."""

    per_query: dict[str, dict[str, dict[str, list[float | None]]]] = field(default_factory=dict)
    answers: dict[str, dict[str, list[list[str]]]] = field(default_factory=dict)
    references: dict[str, list[str]] = field(default_factory=dict)

    def add_evaluation(self, folder: Path, renamed: dict[str, str] | None = None) -> None:
        """Read an evaluation's per-query values and predictions; ``renamed`` maps its system names to ours (the
        merged model is ``recfound`` in its own evaluation), and appends to a name already read (another seed)."""
        renamed = renamed or {}
        per_query = json.loads((folder / PER_QUERY).read_text())
        for system, tasks in per_query.items():
            name = renamed.get(system, system)
            self.per_query.setdefault(name, {})
            for task, metrics in tasks.items():
                for metric, values in metrics.items():
                    self.per_query[name].setdefault(task, {}).setdefault(metric, []).append(values)
        for file in sorted((folder / PREDICTIONS).glob("*.jsonl")):
            rows = [json.loads(line) for line in file.read_text().splitlines()]
            name = renamed.get(file.stem, file.stem)
            for task in dict.fromkeys(r["task"] for r in rows):
                mine = [r for r in rows if r["task"] == task]
                self.answers.setdefault(name, {}).setdefault(task, []).append([r["prediction"] for r in mine])
                self.references.setdefault(task, [r["reference"] for r in mine])

    def interval(self, model: str, baseline: str, task: str, metric: str) -> Interval | None:
        """The interval of (model − baseline) on one metric, each side its mean over the runs read for it (seeds),
        or None when either side left no evidence."""
        ours = self.per_query.get(model, {}).get(task, {}).get(metric)
        theirs = self.per_query.get(baseline, {}).get(task, {}).get(metric)
        if ours is not None and theirs is not None:
            return mean_difference(_per_query_mean(ours), _per_query_mean(theirs))
        scorer = {metric_name(m): m for m in GENERATIVE_METRICS.get(task, ())}.get(metric)
        runs, base = self.answers.get(model, {}).get(task), self.answers.get(baseline, {}).get(task)
        if scorer is None or runs is None or base is None:
            return None
        return metric_difference(scorer, runs, base, self.references[task])


def _per_query_mean(runs: list[list[float | None]]) -> list[float]:
    """Each query's value averaged over the runs (nan where a run has none: a query without positives)."""
    return (
        np.asarray([[np.nan if v is None else v for v in run] for run in runs], dtype=np.float64).mean(axis=0).tolist()
    )


def majority_answers(data: str, tasks: Sequence[str]) -> dict[str, str]:
    """Each classification task's most frequent training response."""
    dataset = Dataset.load(data)
    return {
        task: Counter(dataset.rows(task, "train", ["response"])["response"]).most_common(1)[0][0]
        for task in tasks
        if task in CLASSIFICATION and dataset.count(task, "train")
    }


def add_majority(systems: dict[str, Scores], evidence: Evidence, answers: dict[str, str]) -> None:
    """The majority answer as a system: its score on, and its answers to, the prompts the models were asked."""
    scores: Scores = {}
    for task, answer in answers.items():
        refs = evidence.references.get(task)
        if refs is None:
            continue
        evidence.answers.setdefault(MAJORITY, {})[task] = [[answer] * len(refs)]
        scores[task] = {metric_name(m): m([answer] * len(refs), refs) for m in GENERATIVE_METRICS[task]}
    systems[MAJORITY] = scores


def mean_over_seeds(runs: Sequence[Scores]) -> tuple[Scores, Scores]:
    """(mean, standard deviation) per (task, metric) over the seeds' scores; None where any seed has none."""
    mean: Scores = {}
    spread: Scores = {}
    for task in runs[0]:
        for metric in runs[0][task]:
            values = [run.get(task, {}).get(metric) for run in runs]
            defined = None not in values
            mean.setdefault(task, {})[metric] = float(np.mean(values)) if defined else None
            spread.setdefault(task, {})[metric] = float(np.std(values)) if defined else None
    return mean, spread


def targets(reference: Scores) -> list[tuple[str, str, list[str]]]:
    """(task, metric, baselines) of every comparison the benchmark makes for a model that measured ``reference``:
    the embedding targets, then each generative task's metrics."""
    found = list(EMBEDDING_TARGETS)
    for task in sorted(t for t in reference if t not in EMBEDDING_TASKS):
        baselines = [MAJORITY, "backbone"] if task in CLASSIFICATION else ["backbone"]
        ranked = list_metric_names(task) if task in LIST_PROTOCOLS else ()
        found += [(task, metric, baselines + (RETRIEVAL if metric in ranked else [])) for metric in reference[task]]
    return found


def verdicts(systems: dict[str, Scores], models: list[str], evidence: Evidence | None = None) -> list[dict[str, Any]]:
    """One row per (task, metric, baseline) that both sides measured: the baseline's value, each model's value,
    whether it wins (strictly higher) and, with ``evidence``, the interval of the difference and whether it
    excludes 0."""
    reference = systems[models[0]]
    rows = []
    for task, metric, baselines in targets(reference):
        for baseline in baselines:
            base = systems.get(baseline, {}).get(task, {}).get(metric)
            if base is None or reference.get(task, {}).get(metric) is None:
                continue
            row: dict[str, Any] = {"task": task, "metric": metric, "baseline": baseline, "baseline_value": base}
            for model in models:
                value = systems[model].get(task, {}).get(metric)
                row[model] = value
                row[f"{model}_wins"] = None if value is None else value > base
                bounds = None if evidence is None or value is None else evidence.interval(model, baseline, task, metric)
                row[f"{model}_interval"] = bounds
                row[f"{model}_settled"] = None if bounds is None else settled(bounds)
            rows.append(row)
    return rows


def verdict_cell(wins: bool | None, certain: bool | None) -> str:
    """ "win"/"LOSE", marked "(n.s.)" when the interval of the difference includes 0."""
    if wins is None:
        return "-"
    return ("win" if wins else "LOSE") + ("" if certain is not False else " (n.s.)")

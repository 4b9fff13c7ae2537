"""The evaluation job: the model and the baselines on every task of one dataset split, written as results + report.

Embedding tasks run two protocols per system: the paper's sampled pools (``pool.*``) and a ranking over the
whole catalogue (``full.*``). Generative tasks decode greedily on a seeded sample of prompts; candidate_ranking is
also ranked over candidate lists (``list.*``, eval/candidate_lists.py). Each system runs only the tasks it
supports, one GRM in memory at a time. ``compare`` (eval/compare.py) puts several evaluated or trained runs side
by side instead (e.g. S2Sched vs uniform scheduling).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from recfound.artifacts import read_metrics
from recfound.eval.baselines import BM25, Baseline, ItemCF, MiniLM, Popularity
from recfound.eval.candidate_lists import build_lists, system_list_values
from recfound.eval.closed import closed_answers
from recfound.eval.config import BaselineName, EvalConfig, EvalError, Protocol
from recfound.eval.convergence import summarize
from recfound.eval.metrics import GENERATIVE_METRICS, metric_name
from recfound.eval.protocols import (
    LIST_PROTOCOLS,
    PerQuery,
    averaged,
    full_catalogue_values,
    merge_duplicate_queries,
    pool_values,
    task_candidates,
    training_exclusions,
)
from recfound.eval.report import write_report
from recfound.eval.systems import GRMSystem, ModelSource, load_model, resolve_model
from recfound.io import exists, read_json
from recfound.model.backbone import BackboneConfig, backbone_depth
from recfound.tasks import (
    ALL_TASKS,
    DATASET_MANIFEST,
    EMBEDDING_TASKS,
    INTERACTIONS,
    ITEMS,
    SPLITS,
    Mode,
    mode_of,
    task_path,
)

log = logging.getLogger(__name__)

MODEL = "recfound"
RESULTS = "results.json"
PER_QUERY = "per_query.json"
"""{system: {task: {metric: [value per query or list, null where undefined]}}}, in the order of the rows: the
means in results.json before averaging, for paired comparisons (eval/significance.py)."""
PREDICTIONS = "predictions"


BACKBONE: BaselineName = "backbone"
BASELINES: dict[BaselineName, Callable[[], Baseline]] = {
    "popularity": Popularity,
    "bm25": BM25,
    "item_cf": ItemCF,
    "minilm": MiniLM,
}
"""The reference systems fit on the catalogue; ``backbone`` is built from the model's own backbone instead."""


@dataclass
class Dataset:
    root: str
    manifest: dict[str, Any]
    items: pd.DataFrame
    interactions: pd.DataFrame

    @classmethod
    def load(cls, root: str) -> Dataset:
        if not exists(f"{root}/{DATASET_MANIFEST}"):
            raise EvalError(f"data={root}: no {DATASET_MANIFEST}; build the dataset with jobs/build_dataset.py")
        return cls(
            root,
            read_json(f"{root}/{DATASET_MANIFEST}"),
            pd.read_parquet(f"{root}/{ITEMS}"),
            pd.read_parquet(f"{root}/{INTERACTIONS}"),
        )

    def count(self, task: str, split: str) -> int:
        return int(self.manifest["tasks"].get(task, {}).get(split, 0))

    def rows(self, task: str, split: str, columns: list[str] | None = None) -> pd.DataFrame:
        return pd.read_parquet(f"{self.root}/{task_path(task, split)}", columns=columns)


def _generates(cfg: EvalConfig) -> bool:
    return "generative" in cfg.protocols and cfg.max_rows_per_task > 0


def _ranks_lists(cfg: EvalConfig, task: str) -> bool:
    return task in LIST_PROTOCOLS and "list" in cfg.protocols and cfg.max_rows_per_task > 0


def select_tasks(cfg: EvalConfig, data: Dataset, source: ModelSource) -> list[str]:
    """The tasks to evaluate; an error names any the split lacks or the model cannot route or never trained."""
    embedding = bool({"pool", "full"} & set(cfg.protocols))
    counts = {task: data.count(task, cfg.split) for task in data.manifest["tasks"]}
    if cfg.tasks:
        for task in cfg.tasks:
            if task not in ALL_TASKS:
                raise EvalError(f"tasks: unknown task {task!r}; known tasks: {', '.join(ALL_TASKS)}")
            if counts.get(task, 0) == 0:
                raise EvalError(f"tasks: {task} has no {cfg.split} rows in {data.root} (built: {counts})")
        tasks = cfg.tasks
    else:
        wanted = {Mode.EMBEDDING: embedding, Mode.GENERATIVE: _generates(cfg)}
        tasks = [t for t in ALL_TASKS if counts.get(t, 0) > 0 and (wanted[mode_of(t)] or _ranks_lists(cfg, t))]
        if not any(counts.values()):
            raise EvalError(f"split={cfg.split} of {data.root} has no rows in any task ({counts})")
        if not tasks:
            raise EvalError(
                f"nothing to evaluate: protocols={','.join(cfg.protocols)}, "
                f"max_rows_per_task={cfg.max_rows_per_task}, {cfg.split} rows {counts}"
            )
    missing = [t for t in tasks if t not in source.config.tasks]
    if missing:
        raise EvalError(
            f"model={cfg.model}: its adapter has no task {', '.join(missing)} of the dataset "
            f"(adapter tasks: {', '.join(source.config.tasks)})"
        )
    untrained = [t for t in tasks if source.trained_tasks is not None and t not in source.trained_tasks]
    if untrained:
        trained = ", ".join(source.trained_tasks or ())
        raise EvalError(
            f"model={cfg.model}: the checkpoint's run never trained {', '.join(untrained)} "
            f"(trained: {trained}); set tasks= to the tasks to evaluate"
        )
    return tasks


def check_exit_layer(exit_layer: int | None, source: ModelSource) -> None:
    """Refuse an exit below the backbone's last layer before any model or data loads."""
    depth = backbone_depth(BackboneConfig.model_validate(source.config.backbone))
    if exit_layer is not None and depth is not None and exit_layer > depth:
        raise EvalError(
            f"exit_layer={exit_layer}: the model's backbone ({source.config.backbone.get('name')}) has {depth} "
            f"decoder layers, so exit_layer is 1-{depth}"
        )


@dataclass(frozen=True)
class EmbeddingTask:
    """One embedding task's queries and what every system is ranked against, prepared once for all systems."""

    rows: pd.DataFrame
    positives: list[str | list[str]]
    candidates: np.ndarray
    """Items of this task (any split): the pool protocol's negatives come from them."""
    exclude: list[set[str]]
    """Per query, items the full ranking leaves out (see ``full_exclusions``)."""


def full_exclusions(rows: pd.DataFrame, positives: list[str | list[str]], interactions: pd.DataFrame) -> list[set[str]]:
    """What a full-catalogue ranking leaves out per query: the user's train items (already consumed), the i2i
    anchor (trivially similar to itself) and positives of other rows with the same query text (right answers)."""
    siblings: dict[str, set[str]] = defaultdict(set)
    for query, pos in zip(rows["query"], positives):
        siblings[query].update([pos] if isinstance(pos, str) else pos)
    anchors = rows["query_item"] if "query_item" in rows else pd.Series("", index=rows.index)
    return [
        train | siblings[query] | ({anchor} if anchor else set())
        for train, query, anchor in zip(training_exclusions(rows, interactions), rows["query"], anchors.fillna(""))
    ]


def prepare_embedding(data: Dataset, task: str, split: str) -> EmbeddingTask:
    rows = data.rows(task, split)
    if task == "i2i":  # the paper pools all of an anchor's related items as its positives
        rows, positives = merge_duplicate_queries(rows)
    else:
        positives = rows["pos_item"].tolist()
    frames = [data.rows(task, s, ["pos_item", "neg_items"]) for s in SPLITS if data.count(task, s)]
    candidates = task_candidates(data.items["item_id"].tolist(), *frames)
    return EmbeddingTask(rows, positives, candidates, full_exclusions(rows, positives, data.interactions))


def evaluate_embedding(
    system: Baseline, tasks: dict[str, EmbeddingTask], data: Dataset, protocols: Collection[Protocol], seed: int
) -> dict[str, dict[str, float]]:
    """{task: {"pool.<metric>" | "full.<metric>": value}} for the tasks the system supports."""
    return averages(embedding_values(system, tasks, data, protocols, seed))


def averages(values: dict[str, PerQuery]) -> dict[str, dict[str, float]]:
    """{task: {metric: mean over queries}} of {task: {metric: per-query values}}."""
    return {task: {k: v for k, v in averaged(metrics).items() if k != "queries"} for task, metrics in values.items()}


def embedding_values(
    system: Baseline, tasks: dict[str, EmbeddingTask], data: Dataset, protocols: Collection[Protocol], seed: int
) -> dict[str, PerQuery]:
    """``evaluate_embedding``'s metrics per query."""
    if not {"pool", "full"} & set(protocols):
        return {}
    item_ids, categories = data.items["item_id"].tolist(), data.items["category"].tolist()
    out = {}
    for task, prepared in tasks.items():
        if task not in system.tasks:
            continue
        scorer = system.scorer(task, prepared.rows)
        metrics: PerQuery = {}
        if "pool" in protocols:
            pool = pool_values(
                scorer,
                item_ids,
                prepared.positives,
                prepared.rows["category"].tolist(),
                categories,
                task,
                seed=seed,
                candidates=prepared.candidates,
            )
            metrics |= {f"pool.{k}": v for k, v in pool.items()}
        if "full" in protocols:
            full = full_catalogue_values(scorer, item_ids, prepared.positives, prepared.exclude)
            metrics |= {f"full.{k}": v for k, v in full.items()}
        out[task] = metrics
    return out


def generative_sample(data: Dataset, task: str, split: str, n: int, seed: int) -> pd.DataFrame:
    """A seeded sample of ``n`` rows in file order: rows are grouped by user or item, so a head would not do."""
    rows = data.rows(task, split)
    return rows.sample(n=n, random_state=seed).sort_index() if n < len(rows) else rows


def answer(
    system: GRMSystem, task: str, prompts: list[str], max_new_tokens: int, closed: bool, calibrate: bool = False
) -> list[str]:
    """Free decoding, or, for a classification task with ``closed``, the likeliest of the prompt's valid answers
    (``calibrate``: relative to the model's prior for each, ``GRMSystem.choose``)."""
    choices = [closed_answers(task, p) for p in prompts] if closed else []
    if choices and all(c is not None for c in choices):
        return system.choose(task, prompts, choices, calibrate)
    return system.generate(task, prompts, max_new_tokens)


def evaluate_generative(
    system: GRMSystem,
    samples: dict[str, pd.DataFrame],
    max_new_tokens: int,
    closed: bool = True,
    calibrate: bool = False,
) -> tuple[dict[str, dict[str, float]], list[dict[str, str]]]:
    """({task: {metric: value}}, every prediction with its reference) for the system's generations."""
    metrics, predictions = {}, []
    for task, rows in samples.items():
        preds = answer(system, task, rows["prompt"].tolist(), max_new_tokens, closed, calibrate)
        refs = rows["response"].tolist()
        metrics[task] = {metric_name(metric): metric(preds, refs) for metric in GENERATIVE_METRICS[task]}
        predictions += [
            {"task": task, "id": i, "reference": r, "prediction": p}
            for i, r, p in zip(rows["id"], rows["response"], preds)
        ]
    return metrics, predictions


SystemFactory = Callable[[], Baseline]


def systems(cfg: EvalConfig, source: ModelSource) -> Iterator[tuple[str, SystemFactory]]:
    """(name, factory) in report order; factories build lazily so only one GRM is ever in memory."""
    yield MODEL, lambda: GRMSystem(MODEL, load_model(source), cfg.batch_size, cfg.exit_layer)
    if BACKBONE in cfg.baselines:

        def backbone() -> Baseline:
            torch.manual_seed(cfg.seed)  # the fresh adapter's A matrices; B = 0 keeps them out of the outputs
            return GRMSystem(BACKBONE, load_model(source, fresh=True), cfg.batch_size, cfg.exit_layer)

        yield BACKBONE, backbone
    for name, factory in BASELINES.items():
        if name in cfg.baselines:
            yield name, factory


def json_ready(value: Any) -> Any:
    """nan (an undefined metric) as JSON null, recursively: strict JSON has no NaN."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [json_ready(v) for v in value.tolist()]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run every system on every selected task; write results.json, report.md, plots and predictions to out."""
    assert cfg.model is not None and cfg.data is not None  # the config validator guarantees both
    source = resolve_model(cfg.model)
    check_exit_layer(cfg.exit_layer, source)
    data = Dataset.load(cfg.data)
    tasks = select_tasks(cfg, data, source)
    out = Path(cfg.out)
    (out / PREDICTIONS).mkdir(parents=True, exist_ok=True)
    embedding = {t: prepare_embedding(data, t, cfg.split) for t in tasks if t in EMBEDDING_TASKS}
    samples = {
        t: generative_sample(data, t, cfg.split, cfg.max_rows_per_task, cfg.seed)
        for t in tasks
        if t not in EMBEDDING_TASKS and _generates(cfg)
    }
    lists = [
        build_lists(
            t,
            data.rows(t, cfg.split),
            data.items,
            data.interactions,
            cfg.max_rows_per_task,
            cfg.seed,
            f"{data.root}/{task_path(t, cfg.split)}",
        )
        for t in tasks
        if _ranks_lists(cfg, t)
    ]
    results: dict[str, Any] = {"systems": {}, "skipped": {}, "seconds": {}, "cpu_seconds": {}}
    per_query: dict[str, dict[str, PerQuery]] = {}
    for name, factory in systems(cfg, source):
        start, cpu = time.perf_counter(), time.process_time()  # CPU time stays honest on a shared machine
        try:
            system = factory()
        except ImportError as err:  # an optional baseline whose package is not installed
            log.warning("skipping %s: %s", name, err)
            results["skipped"][name] = str(err)
            continue
        system.fit(data.items, data.interactions)
        values = embedding_values(system, embedding, data, cfg.protocols, cfg.seed)
        scores = averages(values)
        if isinstance(system, GRMSystem) and samples:
            generated, predictions = evaluate_generative(
                system, samples, cfg.max_new_tokens, cfg.closed_answers, cfg.calibrate_answers
            )
            scores |= generated
            (out / PREDICTIONS / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
        listed = system_list_values(system, lists)  # candidate_ranking: beside its generative metric
        scores |= {task: scores.get(task, {}) | metrics for task, metrics in averages(listed).items()}
        del system  # frees a GRM before the next one loads
        results["systems"][name] = scores
        per_query[name] = values | listed
        results["seconds"][name] = round(time.perf_counter() - start, 2)
        results["cpu_seconds"][name] = round(time.process_time() - cpu, 2)
        log.info("%s evaluated in %.1f s (%.1f s CPU)", name, results["seconds"][name], results["cpu_seconds"][name])
    results["queries"] = {t: len(e.rows) for t, e in embedding.items()} | {t: len(s) for t, s in samples.items()}
    results["lists"] = {ranked.task: len(ranked.rows) for ranked in lists}
    results |= {
        "model": str(source.path),
        "model_kind": source.kind.value,
        "data": cfg.data,
        "split": cfg.split,
        "seed": cfg.seed,
        "config": cfg.model_dump(mode="json"),
    }
    histories = {}
    if source.history is not None and source.history.is_file():
        history = read_metrics(source.history)
        results["history"] = str(source.history)
        results["convergence"] = summarize(history, cfg.convergence_target, cfg.convergence_window)
        histories[MODEL] = history
    results = json_ready(results)
    (out / RESULTS).write_text(json.dumps(results, indent=2))
    (out / PER_QUERY).write_text(json.dumps(json_ready(per_query)))
    write_report(results, out, histories)
    return results

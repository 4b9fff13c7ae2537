"""Early exit: embedding throughput and retrieval quality when the GRM reads its embeddings after k of L layers.

Throughput: the same seeded sample of catalogue texts (item side, under the first task's item instruction, batched
by length as the evaluation job batches, tokenised once beforehand: tokenising costs every exit the same) embedded
at every exit and at full depth in interleaved rounds; an exit's speed-up is the median over rounds of full-depth
time / exit time taken in the same round. Quality: the evaluation
job's pool protocol (eval/runner.py ``evaluate_embedding``, the paper's metric per task) on a seeded sample of each
embedding task's rows of the split, the model embedding at that exit (``GRMSystem`` with ``exit_layer``); the pool
scorer embeds the whole catalogue once per task and layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from recfound.bench.common import (
    Better,
    Report,
    Table,
    Target,
    device_sync,
    fmt,
    interleaved,
    median,
    paired_ratio,
    torch_threads,
)
from recfound.bench.embedding import EmbeddingBench, bench_tasks, sample_rows, sample_texts
from recfound.config import CommaList
from recfound.eval.report import headline
from recfound.eval.runner import Dataset, evaluate_embedding, prepare_embedding
from recfound.eval.systems import GRMSystem, item_instruction, load_model, resolve_model
from recfound.model.formats import Side, encode_embedding
from recfound.model.grm import GRM

TARGETS = [
    Target("early exit at half depth: embedding throughput / full depth", "exit_half_vs_full", 1.8, Better.HIGHER)
]


class ExitBench(EmbeddingBench):
    """Early-exit embeddings: texts/s and pool retrieval metrics (U2I/Q2I/I2I) at each exit layer vs full depth."""

    model: str
    """The model: a training checkpoint, run directory, merged artifact or adapter directory (as jobs/evaluate.py);
    best one trained with loss.exit_layers."""
    layers: CommaList[int] = []
    """Exit layers (1 = after the first decoder layer); empty: a quarter, half and three quarters of the backbone's
    depth. Full depth is always measured too: every ratio is against it."""


def exit_layers(bench: ExitBench, grm: GRM) -> list[int]:
    """The exits to measure, shallow first, full depth last (and once)."""
    depth = grm.num_layers
    grm.check_exits(bench.layers, "layers")
    layers = bench.layers or [max(1, depth * q // 4) for q in (1, 2, 3)]
    return sorted(set(layers) | {depth})


def encoded(
    grm: GRM, task: str, instruction: str, texts: list[str], batch_size: int
) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """(item-side batch on the model's device, task ids) per ``batch_size`` texts of similar length."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = []
    for start in range(0, len(texts), batch_size):
        rows = order[start : start + batch_size]
        batch = encode_embedding(
            grm.tokenizer,
            [instruction] * len(rows),
            [texts[i] for i in rows],
            grm.backbone.max_passage_len,
            keep_end=Side.ITEM.keeps_end(task),
        )
        out.append(
            ({k: torch.as_tensor(v, device=grm.device) for k, v in batch.items()}, grm.task_ids([task] * len(rows)))
        )
    return out


def run(bench: ExitBench) -> Report:
    source = resolve_model(bench.model)
    data = Dataset.load(bench.data)
    tasks = bench_tasks(bench.tasks, bench.split, data, list(source.config.tasks))
    with torch_threads(bench.threads):
        grm = load_model(source)
        layers = exit_layers(bench, grm)
        depth = grm.num_layers
        systems = {k: GRMSystem(f"exit{k}", grm, bench.batch_size, k) for k in layers}
        prepared = {t: sample_rows(prepare_embedding(data, t, bench.split), bench.rows, bench.seed) for t in tasks}
        sample = sample_texts(bench, data)
        instruction = item_instruction(prepared[tasks[0]].rows)
        batches = encoded(grm, tasks[0], instruction, sample, bench.batch_size)
        cases = {str(k): (lambda k=k: [grm.embed(batch, ids, k) for batch, ids in batches]) for k in layers}
        with torch.inference_mode():
            timing = interleaved(cases, bench.rounds, bench.warmup, lambda: device_sync(grm.device))
        metrics = {}
        for k, system in systems.items():
            system.fit(data.items, data.interactions)
            metrics[k] = evaluate_embedding(system, prepared, data, ["pool"], bench.seed)
    wall = {k: timing.wall[str(k)] for k in layers}
    queries = {t: len(p.rows) for t, p in prepared.items()}
    return _report(bench, layers, depth, tasks, wall, metrics, len(sample), queries)


def _report(
    bench: ExitBench,
    layers: list[int],
    depth: int,
    tasks: list[str],
    wall: dict[int, list[float]],
    metrics: dict[int, dict[str, dict[str, float]]],
    texts: int,
    queries: dict[str, int],
) -> Report:
    speedup = {k: paired_ratio(wall[depth], wall[k]) for k in layers}
    throughput = {k: texts / median(wall[k]) for k in layers}
    value = {k: {t: metrics[k][t][headline(t)] for t in tasks} for k in layers}
    loss = {k: {t: value[depth][t] - value[k][t] for t in tasks} for k in layers}
    ratios = {f"exit{k}_vs_full": speedup[k] for k in layers if k != depth}
    half = depth // 2
    if half in speedup and half != depth:
        ratios["exit_half_vs_full"] = speedup[half]
    headers = ["exit layer", "share of depth", "texts/s", "speed-up", *(f"{t} {headline(t)}" for t in tasks)]
    rows = [
        [
            f"{k}/{depth}" + (" (full)" if k == depth else ""),
            f"{k / depth:.2f}",
            fmt(throughput[k]),
            fmt(speedup[k]) + "x",
            *(f"{value[k][t]:.4f} ({value[k][t] - value[depth][t]:+.4f})" for t in tasks),
        ]
        for k in layers
    ]
    title = f"Early exit, {texts} catalogue texts per round, {bench.split} split, pool protocol"
    figures: dict[str, Any] = {
        "depth": depth,
        "layers": layers,
        "texts_per_s": {str(k): throughput[k] for k in layers},
        "metrics": {str(k): metrics[k] for k in layers},
        "headline": {str(k): value[k] for k in layers},
        "metric_loss": {str(k): loss[k] for k in layers},
        "queries": queries,
        "wall_s": {str(k): wall[k] for k in layers},
    }
    if half in loss and half != depth:
        figures["metric_loss_half"] = loss[half]
    report = Report("exit", bench.model_dump(mode="json"), ratios, figures, [Table(title, headers, rows)])
    report.check(TARGETS)
    report.notes = [
        (
            f"Speed-up: median over {bench.rounds} rounds of full-depth time / exit time in the same round (wall "
            f"clock, batches of {bench.batch_size}). Metric cells: the paper's pool metric on {queries} queries of "
            f"the {bench.split} split, in brackets the change from full depth (metric loss = full - exit). An exit "
            "runs only its layers, then the final norm and mean pooling; train with loss.exit_layers for usable "
            "exits (an untrained exit reads a layer the read-out never saw)."
        )
    ]
    return report

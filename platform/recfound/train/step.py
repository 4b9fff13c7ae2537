"""The one training step: draw each task's rows, forward, losses, backward, clip and optimizer update.

The Ray worker (train/loop.py), the benchmark's plain loop (bench/train.py) and the pinned-loss test all call
``train_step``, so what is benchmarked and pinned is what trains. What differs between them stays outside: where
the rows come from (Ray Data shards or rows in memory), the engine (DDP, ZeRO, or a plain module), who updates
the schedule (the S2Sched actor or an object) and what is logged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from recfound.tasks import Mode
from recfound.train.batches import Rows, collate
from recfound.train.engine import TrainEngine
from recfound.train.objective import FALSE_NEGATIVES, TaskStats
from recfound.train.telemetry import StepCost


class RowSource(Protocol):
    """A task's training rows in order (a ``TaskStream``, or rows held in memory)."""

    def take(self, n: int) -> Rows: ...


@dataclass
class StepResult:
    """What one step did. ``losses`` are per-task means over every rank's samples; when ``non_finite`` names a
    task its loss was not finite and no update was tried; ``applied`` is False when the gradient norm was not
    finite and the update was skipped."""

    losses: dict[str, float]
    false_negatives: float | None
    non_finite: str | None
    applied: bool
    tokens: int
    samples: int
    flops: float
    data_wait: float


def step_seed(seed: int, rank: int, step: int) -> int:
    """Dropout's seed for one rank's step: distinct per rank and step, and the same after a resume, so a
    resumed run draws the masks the uninterrupted one would have (no RNG state to checkpoint)."""
    return (seed * 1_000_003 + rank) * 1_000_003 + step


def train_step(
    engine: TrainEngine,
    sources: Mapping[str, RowSource],
    counts: Mapping[Mode, Mapping[str, int]],
    *,
    grad_accum: int,
    cost: StepCost,
    seed: int,
    rank: int,
    step: int,
    device: torch.device,
) -> StepResult:
    """One optimizer step over ``grad_accum`` micro-batches of ``counts[mode][task]`` rows each. Every rank
    takes the same counts, so DDP/ZeRO graphs match; the per-task losses are all-reduced, so every rank decides
    alike whether to stop on a non-finite loss."""
    torch.manual_seed(step_seed(seed, rank, step))
    engine.zero_grad()
    stats: TaskStats = {}
    tokens = samples = 0
    flops = data_wait = 0.0
    for _ in range(grad_accum):
        fetch = time.perf_counter()
        parts = {mode: [sources[t].take(n) for t, n in c.items() if n] for mode, c in counts.items()}
        emb = collate(parts.get(Mode.EMBEDDING, []), Mode.EMBEDDING)
        gen = collate(parts.get(Mode.GENERATIVE, []), Mode.GENERATIVE)
        data_wait += time.perf_counter() - fetch
        loss, micro_stats = engine(emb, gen)
        engine.backward(loss)
        for task, (total, count) in micro_stats.items():
            prev = stats.get(task, (0.0, 0))
            stats[task] = (prev[0] + total, prev[1] + count)
        tokens += batch_tokens(emb, gen)
        samples += sum(len(b["task"]) for b in (emb, gen) if b)
        flops += cost.batches(emb, gen)
    tasks = [t for c in counts.values() for t in c]
    losses = reduce_losses(stats, [*tasks, FALSE_NEGATIVES], device)
    false_negatives = losses.pop(FALSE_NEGATIVES, None)
    non_finite = next((t for t, v in losses.items() if not math.isfinite(v)), None)
    applied = non_finite is None and engine.step()
    return StepResult(losses, false_negatives, non_finite, applied, tokens, samples, flops, data_wait)


def reduce_losses(stats: TaskStats, tasks: list[str], device: torch.device) -> dict[str, float]:
    """All-reduce per-task (loss sum, count) so every task's loss is its mean over all ranks' samples."""
    table = torch.zeros(len(tasks), 2, dtype=torch.float64, device=device)
    for i, task in enumerate(tasks):
        if task in stats:
            table[i, 0], table[i, 1] = stats[task][0].double(), stats[task][1].double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(table)
    return {task: (table[i, 0] / table[i, 1]).item() for i, task in enumerate(tasks) if table[i, 1] > 0}


def batch_tokens(emb: dict[str, Any] | None, gen: dict[str, Any] | None) -> int:
    """Real (unpadded) tokens in a step's batches: the throughput figure's numerator."""
    masks = ([emb["q_mask"], emb["p_mask"]] if emb else []) + ([gen["mask"]] if gen else [])
    return sum(int(m.sum()) for m in masks)

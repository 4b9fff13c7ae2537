"""The per-worker training function Ray Train runs: a short, linear recipe over the library's parts.

All ranks take the same per-task sample counts each step (rank 0 asks the S2Sched actor and broadcasts the
weights), so DDP / ZeRO graphs match and the per-task streaming splits stay in step. The engine
(train/engine.py: DDP or DeepSpeed ZeRO, by ``zero_stage``) owns the optimizer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from recfound.model.grm import GRM
from recfound.tasks import Mode, mode_of
from recfound.train import checkpoint
from recfound.train.batches import collate
from recfound.train.config import TrainConfig
from recfound.train.engine import build_engine, verify_partitions
from recfound.train.halt import record_halt
from recfound.train.mixing import allocate
from recfound.train.objective import FALSE_NEGATIVES, JointObjective, TaskStats
from recfound.train.s2sched import LossSource
from recfound.train.streams import Shard, TaskStream, split_tasks
from recfound.train.telemetry import (
    StepCost,
    StepRecord,
    Telemetry,
    peak_flops,
    plot_history,
)
from recfound.train.validation import ValidationProbe

log = logging.getLogger(__name__)


def _broadcast(obj: Any) -> Any:
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _reduce(stats: TaskStats, tasks: list[str], device: torch.device) -> dict[str, float]:
    """All-reduce per-task (loss sum, count) so every task's loss is its mean over all ranks' samples."""
    table = torch.zeros(len(tasks), 2, dtype=torch.float64, device=device)
    for i, task in enumerate(tasks):
        if task in stats:
            table[i, 0], table[i, 1] = stats[task][0].double(), stats[task][1].double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(table)
    return {task: (table[i, 0] / table[i, 1]).item() for i, task in enumerate(tasks) if table[i, 1] > 0}


def step_seed(seed: int, rank: int, step: int) -> int:
    """Dropout's seed for one rank's step: distinct per rank and step, and the same after a resume, so a
    resumed run draws the masks the uninterrupted one would have (no RNG state to checkpoint)."""
    return (seed * 1_000_003 + rank) * 1_000_003 + step


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


def train_worker(config: dict[str, Any]) -> None:
    cfg = TrainConfig.model_validate(config["cfg"])
    tasks: list[str] = config["tasks"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # the same initial adapter on every rank; merge rebuilds it from this seed
    grm = GRM.build(cfg.model.backbone, cfg.model.adapter.build(cfg.model.backbone))
    objective = JointObjective(grm, cfg.loss, cfg.batch.grad_cache_chunk)
    cost = StepCost.of(grm.tuner.model)  # before ZeRO-3 partitions the parameters

    emb_tasks = [t for t in tasks if mode_of(t) is Mode.EMBEDDING]
    gen_tasks = [t for t in tasks if mode_of(t) is Mode.GENERATIVE]
    samplers = {Mode.EMBEDDING: Sampler(emb_tasks, cfg.batch.embedding), Mode.GENERATIVE: Sampler(gen_tasks, cfg.batch.generative)}
    scheduler = ray.get_actor(config["scheduler"], namespace=config["namespace"]) if rank == 0 else None
    probe = None
    if scheduler is not None and cfg.scheduler.source is LossSource.VALID:
        sizes = {Mode.EMBEDDING: cfg.batch.embedding, Mode.GENERATIVE: cfg.batch.generative}
        probe = ValidationProbe(config["data"], tasks, cfg.model.backbone.model_dump(), sizes, cfg.scheduler.valid_batches)

    start, positions, history = 0, {}, []
    restored = ray.train.get_checkpoint()
    if restored is not None:
        restored = checkpoint.resumable(restored, _verify_zero if cfg.zero_stage else checkpoint.verify)
    if restored is None and scheduler is not None:
        # A restart before the first checkpoint starts over: so must the scheduler's history.
        ray.get(scheduler.load_state_dict.remote(config["scheduler_initial"]))
    dtype = next(grm.parameters()).dtype
    state = None
    # The adapter is restored first; the engine is built on it, then loads its optimizer state.
    with restored.as_directory() if restored is not None else contextlib.nullcontext() as d:
        if d is not None:
            state, sched_state, history = checkpoint.load_state(Path(d), grm)
            if cfg.zero_stage and state.get("world_size") != world:
                raise RuntimeError(f"checkpoint {d} holds ZeRO partitions of {state.get('world_size')} workers; "
                                   f"resume it with num_workers={state.get('world_size')} (now {world})")  # fmt: skip
        engine = build_engine(objective, cfg, device, dtype, both_modes=bool(emb_tasks and gen_tasks))
        if d is not None:
            engine.load(Path(d), rank)
    if state is not None:
        start, positions = state["step"], state["streams"]
        for mode, sampler in samplers.items():
            sampler.carry = state["carry"][mode.value]
        if scheduler is not None:
            ray.get(scheduler.load_state_dict.remote(sched_state))

    shards: dict[str, Shard] = {}
    for name, members in config["shared_streams"].items():
        shards |= split_tasks(ray.train.get_dataset_shard(name), members, rank, world)
    shards |= {t: ray.train.get_dataset_shard(t) for t in tasks if t not in shards}
    streams = {t: TaskStream(shards[t], seed=cfg.seed, shuffle_window=cfg.batch.shuffle_window, **positions.get(t, {}))
               for t in tasks}  # fmt: skip
    with ThreadPoolExecutor(len(streams)) as pool:
        list(pool.map(TaskStream.prime, streams.values()))
    weights = _broadcast(ray.get(scheduler.weights.remote())[1] if scheduler is not None else None)
    telemetry = None
    if rank == 0:
        log_dir = Path(tempfile.gettempdir()) / "recfound-tb" / config["run"]
        telemetry = Telemetry(log_dir, peak_flops(device), cfg.log_every, device)
        telemetry.history = history

    skipped = 0
    for step in range(start + 1, cfg.max_steps + 1):
        began = time.perf_counter()
        torch.manual_seed(step_seed(cfg.seed, rank, step))
        engine.zero_grad()
        stats: TaskStats = {}
        tokens = samples = 0
        flops = 0.0
        counts = {mode: s.counts(weights) for mode, s in samplers.items()}
        data_wait = 0.0
        for _ in range(cfg.optim.grad_accum):
            fetch = time.perf_counter()
            parts = {mode: [streams[t].take(n) for t, n in c.items() if n] for mode, c in counts.items()}
            emb, gen = collate(parts[Mode.EMBEDDING], Mode.EMBEDDING), collate(parts[Mode.GENERATIVE], Mode.GENERATIVE)
            data_wait += time.perf_counter() - fetch
            loss, micro_stats = engine(emb, gen)
            engine.backward(loss)
            for task, (total, count) in micro_stats.items():
                prev = stats.get(task, (0.0, 0))
                stats[task] = (prev[0] + total, prev[1] + count)
            tokens, samples = tokens + _tokens(emb, gen), samples + sum(len(b["task"]) for b in (emb, gen) if b)
            flops += cost.batches(emb, gen)
        losses = _reduce(stats, [*tasks, FALSE_NEGATIVES], device)
        false_negatives = losses.pop(FALSE_NEGATIVES, None)
        bad = [t for t, v in losses.items() if not math.isfinite(v)]
        if bad:  # every rank sees the same reduced losses, so all stop here; a retry would fail the same way
            if rank == 0:
                record_halt(config["halt"], step, f"step {step}: loss of task {bad[0]} is {losses[bad[0]]}")
            return
        skipped = 0 if engine.step() else skipped + 1
        if skipped > (0 if cfg.zero_stage else cfg.optim.max_skipped_steps):
            if rank == 0:
                record_halt(config["halt"], step, f"step {step}: gradient norm not finite for {skipped} consecutive "
                                                  f"step(s) while every loss was finite")  # fmt: skip
            return
        if skipped:
            log.warning("step %d: gradient norm not finite; update skipped (%d in a row)", step, skipped)

        round_trip = time.perf_counter()
        if step % cfg.scheduler.update_interval == 0:
            update = None
            if scheduler is not None:
                signal = probe.losses(grm, cfg.loss) if probe is not None else losses
                update = ray.get(scheduler.update.remote(step, signal))[1]
            weights = _broadcast(update)
        round_trip = time.perf_counter() - round_trip
        metrics: dict[str, Any] = {"step": step, "loss": sum(losses.values()) / max(1, len(losses))}
        if telemetry is not None:
            seconds = time.perf_counter() - began
            shares = {"data_wait": data_wait / seconds, "s2sched_round_trip": round_trip / seconds}
            if false_negatives is not None:
                shares["false_negative_queries"] = false_negatives
            record = StepRecord(step, engine.lr(), seconds, tokens, samples, flops, losses, dict(weights), shares)
            metrics |= telemetry.log(record, world)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            # Every rank reports so Ray Train's rounds line up; the files of all ranks land in one directory.
            # A full or read-only disk (here or in the run's storage) fails the step naming the file and cause.
            with checkpoint.writing(f"the checkpoint of step {step}"), tempfile.TemporaryDirectory() as tmp:
                wrote = engine.save(Path(tmp), rank)
                with engine.full_weights():  # ZeRO-3: every rank joins the gather, rank 0 saves the adapter
                    if scheduler is not None and telemetry is not None:
                        if step == cfg.max_steps:
                            plot_history(telemetry.history, Path(tmp))
                        state = _trainer_state(step, cfg.seed, world, streams, samplers)
                        sched_state = ray.get(scheduler.state_dict.remote())
                        checkpoint.save(Path(tmp), grm, state, sched_state, telemetry.history)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if wrote else None)
        elif step % cfg.log_every == 0:  # each report is a round trip to the controller: not every step
            ray.train.report(metrics)
    if telemetry is not None:
        telemetry.close()


def _verify_zero(root: Path) -> None:
    """A ZeRO checkpoint is resumable when its manifest and every rank's partition verify."""
    checkpoint.verify(root)
    verify_partitions(root)


def _tokens(emb: dict | None, gen: dict | None) -> int:
    masks = ([emb["q_mask"], emb["p_mask"]] if emb else []) + ([gen["mask"]] if gen else [])
    return sum(int(m.sum()) for m in masks)


def _trainer_state(step: int, seed: int, world: int, streams: dict[str, TaskStream], samplers: dict[Mode, Sampler]) -> dict:
    return {
        "step": step,
        "seed": seed,
        "world_size": world,
        "streams": {t: s.state() for t, s in streams.items()},
        "carry": {mode.value: s.carry for mode, s in samplers.items()},
    }

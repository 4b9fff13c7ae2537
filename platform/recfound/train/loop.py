"""The per-worker training function Ray Train runs: a short, linear recipe over the library's parts.

All ranks take the same per-task sample counts each step (rank 0 asks the S2Sched actor and broadcasts the
weights), so DDP graphs match and the per-task streaming splits stay in step.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
import tempfile
import time
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
from recfound.train.mixing import allocate
from recfound.train.objective import JointObjective, TaskStats
from recfound.train.optim import build_lr_schedule, build_optimizer
from recfound.train.s2sched import LossSource
from recfound.train.streams import TaskStream
from recfound.train.validation import ValidationProbe
from recfound.train.telemetry import StepRecord, Telemetry, flops_per_token, peak_flops, plot_history


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
    torch.manual_seed(cfg.seed + rank)  # distinct dropout per rank
    objective = JointObjective(grm, cfg.loss)
    params = [p for p in grm.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim)
    lr_schedule = build_lr_schedule(optimizer, cfg.optim, cfg.max_steps)

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
    if restored is None and scheduler is not None:
        # A restart before the first checkpoint starts over: so must the scheduler's history.
        ray.get(scheduler.load_state_dict.remote(config["scheduler_initial"]))
    if restored is not None:
        with restored.as_directory() as d:
            state, sched_state, history = checkpoint.load_state(Path(d), grm, optimizer, lr_schedule)
        start, positions = state["step"], state["streams"]
        for mode, sampler in samplers.items():
            sampler.carry = state["carry"][mode.value]
        if scheduler is not None:
            ray.get(scheduler.load_state_dict.remote(sched_state))
        torch.manual_seed(cfg.seed + rank + start)

    model = ray.train.torch.prepare_model(
        objective, parallel_strategy_kwargs={"find_unused_parameters": not (emb_tasks and gen_tasks)}
    )
    streams = {t: TaskStream(ray.train.get_dataset_shard(t), **positions.get(t, {})) for t in tasks}
    with ThreadPoolExecutor(len(streams)) as pool:
        list(pool.map(TaskStream.prime, streams.values()))
    weights = _broadcast(ray.get(scheduler.weights.remote())[1] if scheduler is not None else None)
    telemetry = None
    if rank == 0:
        log_dir = Path(tempfile.gettempdir()) / "recfound-tb" / config["run"]
        telemetry = Telemetry(log_dir, flops_per_token(sum(p.numel() for p in grm.parameters())), peak_flops(device), cfg.log_every)
        telemetry.history = history

    for step in range(start + 1, cfg.max_steps + 1):
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        stats: TaskStats = {}
        tokens = samples = 0
        counts = {mode: s.counts(weights) for mode, s in samplers.items()}
        data_wait = 0.0
        for _ in range(cfg.optim.grad_accum):
            fetch = time.perf_counter()
            parts = {mode: [streams[t].take(n) for t, n in c.items() if n] for mode, c in counts.items()}
            emb, gen = collate(parts[Mode.EMBEDDING], Mode.EMBEDDING), collate(parts[Mode.GENERATIVE], Mode.GENERATIVE)
            data_wait += time.perf_counter() - fetch
            loss, micro_stats = model(emb, gen)
            (loss / cfg.optim.grad_accum).backward()
            for task, (total, count) in micro_stats.items():
                prev = stats.get(task, (0.0, 0))
                stats[task] = (prev[0] + total, prev[1] + count)
            tokens, samples = tokens + _tokens(emb, gen), samples + sum(len(b["task"]) for b in (emb, gen) if b)
        losses = _reduce(stats, tasks, device)
        bad = [t for t, v in losses.items() if not math.isfinite(v)]
        if bad:  # every rank sees the same reduced losses, so all stop here; a retry would fail the same way
            if scheduler is not None:
                ray.get(scheduler.halt.remote(f"step {step}: loss of task {bad[0]} is {losses[bad[0]]}"))
            return
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        lr_schedule.step()

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
            record = StepRecord(step, lr_schedule.get_last_lr()[0], seconds, tokens, samples, losses, dict(weights), shares)
            metrics |= telemetry.log(record, world)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            # Rank 0 writes the checkpoint; every rank reports so Ray Train's rounds line up.
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if scheduler is not None and telemetry is not None:
                    if step == cfg.max_steps:
                        plot_history(telemetry.history, Path(tmp))
                    state = _trainer_state(step, cfg.seed, streams, samplers)
                    sched_state = ray.get(scheduler.state_dict.remote())
                    checkpoint.save(Path(tmp), grm, optimizer, lr_schedule, state, sched_state, telemetry.history)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt)
        elif step % cfg.log_every == 0:  # each report is a round trip to the controller: not every step
            ray.train.report(metrics)
    if telemetry is not None:
        telemetry.close()


def _tokens(emb: dict | None, gen: dict | None) -> int:
    masks = ([emb["q_mask"], emb["p_mask"]] if emb else []) + ([gen["mask"]] if gen else [])
    return sum(int(m.sum()) for m in masks)


def _trainer_state(step: int, seed: int, streams: dict[str, TaskStream], samplers: dict[Mode, Sampler]) -> dict:
    return {
        "step": step,
        "seed": seed,
        "streams": {t: s.state() for t, s in streams.items()},
        "carry": {mode.value: s.carry for mode, s in samplers.items()},
    }

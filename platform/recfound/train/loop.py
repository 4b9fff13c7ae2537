"""The per-worker training function Ray Train runs: a short, linear recipe over the library's parts.

All ranks take the same per-task sample counts each step (rank 0 asks the S2Sched actor and broadcasts the
weights), so DDP / ZeRO graphs match and the per-task streaming splits stay in step. The engine
(train/engine.py: DDP or DeepSpeed ZeRO, by ``zero_stage``) owns the optimizer.
"""

from __future__ import annotations

import contextlib
import logging
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
from recfound.train.batches import worker_rows
from recfound.train.engine import build_engine, verify_partitions
from recfound.train.halt import record_halt
from recfound.train.mixing import Sampler
from recfound.train.objective import JointObjective
from recfound.train.s2sched import LossSource
from recfound.train.step import train_step
from recfound.train.streams import MemoryShard, Shard, TaskStream
from recfound.train.telemetry import (
    StepCost,
    StepRecord,
    Telemetry,
    peak_flops,
    plot_history,
)
from recfound.train.validation import ValidationProbe
from recfound.train.worker import WorkerArgs

log = logging.getLogger(__name__)


def _broadcast(obj: Any) -> Any:
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def train(args: WorkerArgs) -> None:
    """One worker's whole run (``worker.train_worker``)."""
    cfg, tasks = args.cfg, args.tasks
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # the same initial adapter on every rank; merge rebuilds it from this seed
    grm = GRM.build(cfg.model.backbone, cfg.model.adapter.build(cfg.model.backbone))
    objective = JointObjective(grm, cfg.loss, cfg.batch.grad_cache_chunk, args.prior)
    cost = StepCost.of(grm.tuner.model)  # before ZeRO-3 partitions the parameters

    emb_tasks = [t for t in tasks if mode_of(t) is Mode.EMBEDDING]
    gen_tasks = [t for t in tasks if mode_of(t) is Mode.GENERATIVE]
    samplers = {
        Mode.EMBEDDING: Sampler(emb_tasks, cfg.batch.embedding),
        Mode.GENERATIVE: Sampler(gen_tasks, cfg.batch.generative),
    }
    scheduler = ray.get_actor(args.scheduler, namespace=args.namespace) if rank == 0 else None
    probe = None
    if scheduler is not None and cfg.scheduler.source is LossSource.VALID:
        sizes = {Mode.EMBEDDING: cfg.batch.embedding, Mode.GENERATIVE: cfg.batch.generative}
        probe = ValidationProbe(args.data, tasks, cfg.model.backbone.model_dump(), sizes, cfg.scheduler.valid_batches)

    start, positions, history = 0, {}, []
    restored = ray.train.get_checkpoint()
    if restored is not None:
        restored = checkpoint.resumable(restored, _verify_zero if cfg.zero_stage else checkpoint.verify)
    if restored is None and scheduler is not None:
        # A restart before the first checkpoint starts over: so must the scheduler's history.
        ray.get(scheduler.load_state_dict.remote(args.scheduler_initial))
    dtype = next(grm.parameters()).dtype
    state = None
    # The adapter is restored first; the engine is built on it, then loads its optimizer state.
    with restored.as_directory() if restored is not None else contextlib.nullcontext() as d:
        if d is not None:
            state, sched_state, history = checkpoint.load_state(Path(d), grm)
            if cfg.zero_stage and state.get("world_size") != world:
                raise RuntimeError(
                    f"checkpoint {d} holds ZeRO partitions of {state.get('world_size')} workers; "
                    f"resume it with num_workers={state.get('world_size')} (now {world})"
                )
        engine = build_engine(objective, cfg, device, dtype, both_modes=bool(emb_tasks and gen_tasks))
        if d is not None:
            engine.load(Path(d), rank)
    if state is not None:
        start, positions = state["step"], state["streams"]
        for mode, sampler in samplers.items():
            sampler.carry = state["carry"][mode.value]
        if scheduler is not None:
            ray.get(scheduler.load_state_dict.remote(sched_state))

    backbone = cfg.model.backbone.model_dump()
    shards: dict[str, Shard] = {
        t: MemoryShard(worker_rows(args.data, t, backbone, rank, world)) for t in args.small_tasks
    }
    shards |= {t: ray.train.get_dataset_shard(t) for t in tasks if t not in shards}
    streams = {
        t: TaskStream(shards[t], seed=cfg.seed, shuffle_window=cfg.batch.shuffle_window, **positions.get(t, {}))
        for t in tasks
    }
    with ThreadPoolExecutor(len(streams)) as pool:
        list(pool.map(TaskStream.prime, streams.values()))
    weights = _broadcast(ray.get(scheduler.weights.remote())[1] if scheduler is not None else None)
    telemetry = None
    if rank == 0:
        peak = peak_flops(device, dtype)
        telemetry = Telemetry(args.tensorboard, peak, cfg.log_every, cfg.max_steps, device, dtype=dtype)
        telemetry.history = history

    skipped = 0
    for step in range(start + 1, cfg.max_steps + 1):
        began = time.perf_counter()
        counts = {mode: s.counts(weights) for mode, s in samplers.items()}
        done = train_step(
            engine,
            streams,
            counts,
            grad_accum=cfg.optim.grad_accum,
            cost=cost,
            seed=cfg.seed,
            rank=rank,
            step=step,
            device=device,
        )
        losses, bad = done.losses, done.non_finite
        if bad:  # every rank sees the same reduced losses, so all stop here; a retry would fail the same way
            if rank == 0:
                record_halt(args.halt, step, f"step {step}: loss of task {bad} is {losses[bad]}")
            return
        skipped = 0 if done.applied else skipped + 1
        if skipped > (0 if cfg.zero_stage else cfg.optim.max_skipped_steps):
            if rank == 0:
                record_halt(
                    args.halt,
                    step,
                    f"step {step}: gradient norm not finite for {skipped} consecutive "
                    f"step(s) while every loss was finite",
                )
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
            shares = {"data_wait": done.data_wait / seconds, "s2sched_round_trip": round_trip / seconds}
            if done.false_negatives is not None:
                shares["false_negative_queries"] = done.false_negatives
            rows = {t: n * cfg.optim.grad_accum * world for c in counts.values() for t, n in c.items() if n}
            record = StepRecord(
                step, engine.lr(), seconds, done.tokens, done.samples, done.flops, losses, dict(weights), shares, rows
            )
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
                        telemetry.sync()
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if wrote else None)
        elif step % cfg.log_every == 0:  # each report is a round trip to the controller: not every step
            ray.train.report(metrics)
    if telemetry is not None:
        telemetry.close()


def _verify_zero(root: Path) -> None:
    """A ZeRO checkpoint is resumable when its manifest and every rank's partition verify."""
    checkpoint.verify(root)
    verify_partitions(root)


def _trainer_state(
    step: int, seed: int, world: int, streams: dict[str, TaskStream], samplers: dict[Mode, Sampler]
) -> dict:
    return {
        "step": step,
        "seed": seed,
        "world_size": world,
        "streams": {t: s.state() for t, s in streams.items()},
        "carry": {mode.value: s.carry for mode, s in samplers.items()},
    }

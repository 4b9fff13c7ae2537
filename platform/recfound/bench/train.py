"""The TorchTrainer run (Ray Train + per-task Ray Data streams + the S2Sched actor) against a plain PyTorch loop.

The plain loop calls the trainer's own step (``train.step.train_step``) with Ray taken out: one process, the same
seeds, GRM, JointObjective and engine (without the DDP wrapper), the same rows in the same order (pre-tokenised in
memory by the trainer's ``tokenize``, so its data costs nothing), and S2Sched as an object instead of an actor. It
runs before and after the TorchTrainer run (A-B-A), and the trainer is compared with the mean of the two, which
cancels load that drifts linearly over the pair. Trainer figures come from the run's metrics.jsonl (the step body)
and from its TensorBoard event times (the whole iteration, ``ray.train.report`` included), after the first ``skip``
steps.
"""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from recfound.artifacts import TENSORBOARD_DIR, read_metrics
from recfound.bench.common import (
    CONFIG_DIR,
    Better,
    Report,
    Table,
    Target,
    fmt,
    median,
    percentile,
    top_ops,
    torch_threads,
)
from recfound.config import Config, load_config
from recfound.model.grm import GRM
from recfound.tasks import Mode, mode_of
from recfound.train.batches import tokenize_table, train_table
from recfound.train.config import TrainConfig
from recfound.train.engine import TorchEngine
from recfound.train.mixing import Sampler
from recfound.train.objective import JointObjective
from recfound.train.run import Plan, item_prior, plan
from recfound.train.run import run as train_run
from recfound.train.s2sched import S2Sched
from recfound.train.step import train_step
from recfound.train.streams import MemoryShard, TaskStream
from recfound.train.telemetry import StepCost, StepRecord, Telemetry, peak_flops

CHUNK = 64  # rows per tokenised batch, as run._datasets' map_batches and TaskStream use
TB_TAG = "throughput/tokens_per_s"  # one event per step
TARGETS = [
    Target("TorchTrainer step / plain loop (metrics.jsonl seconds)", "trainer_vs_plain_step", 1.05, Better.LOWER),
    Target("TorchTrainer iteration / plain loop (wall, report included)", "trainer_vs_plain_wall", 1.05, Better.LOWER),
    Target("S2Sched round trip, share of step time", "s2sched_share", 0.01, Better.LOWER),
    Target("data wait, share of step time", "data_wait_share", 0.02, Better.LOWER),
    Target("FLOP share of measured GEMM peak (CPU) / MFU (GPU)", "flop_share", 0.5, Better.HIGHER),
]


class TrainBench(Config):
    """TorchTrainer step time (Ray Data streams + the S2Sched actor) vs a plain single-process PyTorch loop on the
    same model, config and batches; S2Sched and data-wait shares, tokens/s, FLOP share / MFU."""

    config: str = str(CONFIG_DIR / "tiny.yaml")
    """Training config (YAML) both loops run."""
    overrides: list[str] = []
    """TrainConfig key=value overrides applied to the config, e.g. data=<dir> tasks=[u2i,sentiment_analysis]."""
    steps: int = Field(30, ge=2)
    """Optimizer steps of each loop (the run's max_steps)."""
    skip: int = Field(5, ge=0)
    """First steps of each loop left out as warm-up (Ray Data pipelines starting, allocator warm-up)."""
    workers: int = Field(1, ge=1)
    """Ray Train workers. 1 is like for like with the single-process loop; 2 adds DDP all-reduce."""
    pairs: int = Field(1, ge=1)
    """(plain loop, TorchTrainer run, plain loop) triples, run one after another; ratios are medians over them."""
    storage: str = "runs/bench/train"
    """storage_path of the benchmark's runs."""
    profile: bool = False
    """Profile three more steps of the last plain loop with torch.profiler and report their top operators."""


def preload(data: str, task: str, rows: int, backbone: dict[str, Any]) -> MemoryShard:
    """The first ``rows`` train rows of ``task``, tokenised by the trainer's tokenisation and held in memory, served
    like a Ray Data shard: the loop's data costs nothing (the stream restarts an epoch when a step needs more)."""
    return MemoryShard(tokenize_table(train_table(data, task).slice(0, rows), backbone, task))


class PlainLoop:
    """``train_step`` as rank 0 of a one-worker run calls it, without Ray: no DDP wrapper, no actor, no reports, no
    dataset shards. S2Sched is fed the training losses (its default source)."""

    def __init__(self, cfg: TrainConfig, planned: Plan, steps: int) -> None:
        data, tasks = planned.data, planned.tasks
        self.cfg, self.tasks = cfg, tasks
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        torch.manual_seed(cfg.seed)
        self.grm = GRM.build(cfg.model.backbone, cfg.model.adapter.build(cfg.model.backbone)).to(self.device)
        self.scheduler = S2Sched(tasks, planned.rows, cfg.scheduler)
        self.weights = dict(self.scheduler.weights)
        objective = JointObjective(self.grm, cfg.loss, cfg.batch.grad_cache_chunk, item_prior(planned, cfg))
        self.engine = TorchEngine(objective, [p for p in objective.parameters() if p.requires_grad], cfg)
        sizes = {Mode.EMBEDDING: cfg.batch.embedding, Mode.GENERATIVE: cfg.batch.generative}
        self.samplers = {mode: Sampler([t for t in tasks if mode_of(t) is mode], size) for mode, size in sizes.items()}
        backbone = cfg.model.backbone.model_dump()
        self.streams = {
            t: TaskStream(
                preload(data, t, steps * cfg.optim.grad_accum * sizes[mode_of(t)], backbone),
                seed=cfg.seed,
                shuffle_window=cfg.batch.shuffle_window,
            )
            for t in tasks
        }
        self.cost = StepCost.of(self.grm.tuner.model)
        dtype = next(self.grm.parameters()).dtype
        self.telemetry = Telemetry(
            None, peak_flops(self.device, dtype), every=10**9, total=steps, device=self.device, dtype=dtype
        )  # no lines
        self.step_count = 0

    def step(self) -> dict[str, Any]:
        """One optimizer step, the trainer's ``train_step`` on rank 0; returns its telemetry row (the fields of
        metrics.jsonl)."""
        self.step_count += 1
        step = self.step_count
        began = time.perf_counter()
        counts = {mode: s.counts(self.weights) for mode, s in self.samplers.items()}
        done = train_step(
            self.engine,
            self.streams,
            counts,
            grad_accum=self.cfg.optim.grad_accum,
            cost=self.cost,
            seed=self.cfg.seed,
            rank=0,
            step=step,
            device=self.device,
        )
        if step % self.cfg.scheduler.update_interval == 0:
            self.weights = self.scheduler.update(step, done.losses)
        seconds = time.perf_counter() - began
        record = StepRecord(
            step,
            self.engine.lr(),
            seconds,
            done.tokens,
            done.samples,
            done.flops,
            done.losses,
            dict(self.weights),
            {"data_wait": done.data_wait / seconds},
        )
        self.telemetry.log(record, 1)
        return self.telemetry.history[-1]


def run_plain(
    cfg: TrainConfig, planned: Plan, steps: int, profile: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Telemetry rows of ``steps`` plain-loop steps and, with ``profile``, the top operators of three more. Runs
    on as many torch threads as a Ray Train worker gets (Ray sets OMP_NUM_THREADS to its CPUs)."""
    with torch_threads(max(1, int(cfg.cpus_per_worker))):
        loop = PlainLoop(cfg, planned, steps + (3 if profile else 0))
        rows = [loop.step() for _ in range(steps)]
        ops = top_ops(lambda: [loop.step() for _ in range(3)]) if profile else []
    return rows, ops


def _records(blob: bytes) -> Iterator[bytes]:
    """TFRecord framing of an event file: u64 length, u32 CRC, payload, u32 CRC."""
    pos = 0
    while pos + 12 <= len(blob):
        (length,) = struct.unpack("<Q", blob[pos : pos + 8])
        yield blob[pos + 12 : pos + 12 + length]
        pos += 12 + length + 4


def wall_intervals(events: Path) -> dict[int, float]:
    """Step -> seconds since the previous step's TensorBoard event: the whole iteration, including
    ``ray.train.report`` and everything else the step timer in metrics.jsonl does not cover."""
    from tensorboardX.proto.event_pb2 import Event

    walls: dict[int, float] = {}
    for path in sorted(events.glob("events.out.tfevents.*")):
        for payload in _records(path.read_bytes()):
            event = Event.FromString(payload)
            if any(v.tag == TB_TAG for v in event.summary.value):
                walls[event.step] = event.wall_time
    steps = sorted(walls)
    return {b: walls[b] - walls[a] for a, b in zip(steps, steps[1:])}


def summarize(rows: list[dict[str, Any]], skip: int, walls: Mapping[int, float] | None = None) -> dict[str, Any]:
    """Medians over the steps after ``skip`` (the wall iteration: mean); shares are of total step time."""
    kept = [r for r in rows if r["step"] > skip]
    seconds = sum(r["seconds"] for r in kept)
    label = "mfu" if "mfu" in kept[0] else "flop_share"
    share = lambda key: sum(r["extra"].get(key, 0.0) * r["seconds"] for r in kept) / seconds  # noqa: E731
    out = {
        "steps": len(kept),
        "step_s": median([r["seconds"] for r in kept]),
        "step_s_p25": percentile([r["seconds"] for r in kept], 25),
        "tokens_per_s": median([r["tokens_per_s"] for r in kept]),
        "samples_per_s": sum(r["samples"] for r in kept) / seconds,
        "s_per_token": seconds / sum(r["tokens"] for r in kept),
        "s_per_step": seconds / len(kept),
        "peak_label": label,
        label: median([r[label] for r in kept]),
        "data_wait_share": share("data_wait"),
        "data_wait_max": max(r["extra"].get("data_wait", 0.0) for r in kept),
        "s2sched_share": share("s2sched_round_trip"),
        "s2sched_max": max(r["extra"].get("s2sched_round_trip", 0.0) for r in kept),
    }
    if walls is not None:  # a mean, not a median: a stall every few steps is exactly what it must show
        kept_walls = [w for step, w in walls.items() if step > skip]
        out["wall_s"] = sum(kept_walls) / len(kept_walls)
        out["wall_s_max"] = max(kept_walls)
    return out


def _config(bench: TrainBench, name: str) -> TrainConfig:
    fixed = [
        f"max_steps={bench.steps}",
        f"num_workers={bench.workers}",
        f"checkpoint_every={bench.steps}",
        f"storage_path={bench.storage}",
        f"name={name}",
    ]
    return load_config(TrainConfig, bench.config, [*bench.overrides, *fixed])


def run(bench: TrainBench) -> Report:
    import ray

    if bench.skip >= bench.steps:
        raise ValueError(f"skip={bench.skip} leaves none of the {bench.steps} steps to measure")
    started_ray = not ray.is_initialized()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    cfg = _config(bench, f"bench-{stamp}-{uuid.uuid4().hex[:4]}")
    triples: list[dict[str, Any]] = []
    ops: list[dict[str, Any]] = []
    try:
        for i in range(bench.pairs):
            cfg = cfg.model_copy(update={"name": f"bench-{stamp}-{uuid.uuid4().hex[:4]}-{i}"})
            p = plan(cfg)
            before, _ = run_plain(cfg, p, bench.steps)
            checkpoint = Path(train_run(cfg))
            history = read_metrics(checkpoint)
            after, ops = run_plain(cfg, p, bench.steps, profile=bench.profile and i == bench.pairs - 1)
            triples.append(
                {
                    "name": p.name,
                    "data": p.data,
                    "tasks": p.tasks,
                    "trainer": summarize(
                        history, bench.skip, wall_intervals(Path(p.storage_path, p.name, TENSORBOARD_DIR))
                    ),
                    "plain_before": summarize(before, bench.skip),
                    "plain_after": summarize(after, bench.skip),
                    "trainer_rows": history,
                    "plain_before_rows": before,
                    "plain_after_rows": after,
                }
            )
    finally:
        if started_ray:
            ray.shutdown()
    return _report(bench, triples, ops, cfg)


def _report(bench: TrainBench, triples: list[dict[str, Any]], ops: list[dict[str, Any]], cfg: TrainConfig) -> Report:
    for t in triples:  # the reference: the mean of the plain loops run just before and just after the trainer
        t["plain"] = {
            k: (t["plain_before"][k] + t["plain_after"][k]) / 2
            for k, v in t["plain_before"].items()
            if isinstance(v, float)
        }
    per_triple = lambda f: median([f(t["trainer"], t["plain"]) for t in triples])  # noqa: E731
    trainer = lambda key: median([t["trainer"][key] for t in triples])  # noqa: E731
    label = triples[0]["trainer"]["peak_label"]
    ratios = {
        "trainer_vs_plain_step": per_triple(lambda t, p: t["step_s"] / p["step_s"]),
        "trainer_vs_plain_wall": per_triple(lambda t, p: t["wall_s"] / p["s_per_step"]),
        "trainer_vs_plain_step_p25": per_triple(lambda t, p: t["step_s_p25"] / p["step_s_p25"]),
        "trainer_vs_plain_time_per_token": per_triple(lambda t, p: t["s_per_token"] / p["s_per_token"]),
        "plain_after_vs_before": median([t["plain_after"]["step_s"] / t["plain_before"]["step_s"] for t in triples]),
    }
    figures: dict[str, Any] = {
        "s2sched_share": trainer("s2sched_share"),
        "data_wait_share": trainer("data_wait_share"),
        "flop_share": trainer(label),
        "peak_label": label,
        "tasks": triples[0]["tasks"],
        "data": triples[0]["data"],
        "runs": triples,
        "profile": ops,
    }

    def row(name: str, side: str) -> list[str]:
        get = lambda key: median([t[side][key] for t in triples])  # noqa: E731
        # Nothing runs between plain-loop steps: their iteration is the step (mean, like the trainer's).
        wall = get("wall_s") if side == "trainer" else get("s_per_step")
        return [
            name,
            fmt(get("step_s") * 1e3),
            fmt(get("step_s_p25") * 1e3),
            fmt(wall * 1e3),
            fmt(get("tokens_per_s")),
            fmt(get("samples_per_s")),
            f"{get(label):.1%}",
            f"{get('data_wait_share'):.2%}",
            f"{get('s2sched_share'):.2%}" if side == "trainer" else "-",
        ]

    rows = [
        row("TorchTrainer", "trainer"),
        row("plain loop (before)", "plain_before"),
        row("plain loop (after)", "plain_after"),
        [
            "TorchTrainer / mean plain",
            *(
                fmt(ratios[k]) + "x"
                for k in ("trainer_vs_plain_step", "trainer_vs_plain_step_p25", "trainer_vs_plain_wall")
            ),
            fmt(1 / ratios["trainer_vs_plain_time_per_token"]) + "x",
            "",
            "",
            "",
            "",
        ],
    ]
    tables = [
        Table(
            f"Training step, {bench.workers} worker(s), steps {bench.skip + 1}..{bench.steps}",
            [
                "loop",
                "step ms (metrics)",
                "p25 step ms",
                "iteration ms (wall)",
                "tokens/s",
                "samples/s",
                label,
                "data wait",
                "S2Sched",
            ],
            rows,
        )
    ]
    if ops:
        tables.append(
            Table(
                "Top operators, three plain-loop steps (self CPU time)",
                ["op", "self ms", "share", "calls"],
                [[o["op"], fmt(o["self_ms"]), f"{o['share']:.1%}", str(o["calls"])] for o in ops],
            )
        )
    config = bench.model_dump(mode="json") | {"train_config": cfg.model_dump(mode="json", exclude={"name"})}
    report = Report("train", config, ratios, figures, tables)
    report.notes = [
        "step ms: median of the step body as metrics.jsonl times it (data, forward, backward, optimizer, S2Sched "
        "update); p25: its lower quartile, the figure other tenants inflate least (they only ever add time). "
        "iteration ms: mean time between consecutive steps' TensorBoard events, i.e. the step plus "
        "ray.train.report and everything else between steps. Shares are of total step-body time after the skipped "
        "steps; "
        f"{label} uses the nanoGPT 6N FLOPs/token estimate (N = all parameters, frozen ones included)."
    ]
    report.check(TARGETS)
    return report

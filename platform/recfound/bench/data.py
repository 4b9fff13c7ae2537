"""Can data keep up with training? Dataset build rows/s and Ray Data tokenise+batch rows/s against the samples/s
a training step consumes (the plain loop of ``bench.train``: the fastest consumer, so the ratio is conservative).

The tokenising pipeline is the trainer's own: ``run._datasets`` (per-task ``read_parquet`` + ``map_batches(
tokenize)``), iterated to the end in the batches TaskStream asks for.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.data
from pydantic import Field

from recfound.bench.common import CONFIG_DIR, Better, Report, Table, Target, fmt, median
from recfound.bench.train import CHUNK, run_plain, summarize
from recfound.config import Config, load_config
from recfound.data.builder import BuildConfig, build
from recfound.data.synthetic import SyntheticConfig
from recfound.train.config import TrainConfig
from recfound.train.run import _datasets, plan

TARGETS = [Target("Ray Data tokenise rows/s / training samples/s", "ray_data_vs_train", 1.0, Better.HIGHER)]


class DataBench(Config):
    """Dataset build rows/s (synthetic catalogue of a given size) and Ray Data tokenise+batch rows/s vs the
    training consumption rate (samples/s of the plain training loop) -> ratios; > 1 means data keeps up."""

    users: int = Field(1000, ge=10)
    """Synthetic users (the catalogue's size drives the build; each writes 5-12 reviews)."""
    items: int = Field(500, ge=20)
    """Synthetic items."""
    queries: int = Field(120, ge=0)
    """Synthetic search queries."""
    config: str = str(CONFIG_DIR / "tiny.yaml")
    """Training config: token budgets and batch sizes of the consumer."""
    overrides: list[str] = []
    """TrainConfig key=value overrides, e.g. tasks=[u2i,sentiment_analysis]."""
    rounds: int = Field(2, ge=1)
    """Rounds of (build, Ray Data pass, training pass), interleaved; figures are medians."""
    train_steps: int = Field(12, ge=2)
    """Plain-loop steps per round for the consumption rate."""
    skip: int = Field(2, ge=0)
    """First plain-loop steps left out (allocator warm-up)."""
    out_dir: str = "runs/bench/data"
    """Where the synthetic dataset is built (replaced each round)."""


@dataclass(frozen=True)
class Pass:
    """Every task's batches as (seconds since start, rows), tasks streamed concurrently the way training pulls
    them. The rate counts start-up too: with pipelines finishing at different times there is no clean steady
    state to separate, and including it only makes the keep-up ratio conservative."""

    batches: dict[str, list[tuple[float, int]]]

    @property
    def rows(self) -> int:
        return sum(n for batches in self.batches.values() for _, n in batches)

    @property
    def first_batch_s(self) -> float:
        """Until every pipeline has delivered its first batch: what training's first step waits for."""
        return max(batches[0][0] for batches in self.batches.values())

    @property
    def seconds(self) -> float:
        return max(batches[-1][0] for batches in self.batches.values())


def _ray_data_pass(cfg: TrainConfig) -> Pass:
    """Every task's whole train split through the trainer's own tokenising pipelines, one consumer thread per
    task as the trainer's streams consume them: all at once, start-ups overlapped."""
    datasets = _datasets(plan(cfg), cfg)
    start = time.perf_counter()

    def drain(ds: ray.data.Dataset) -> list[tuple[float, int]]:
        return [(time.perf_counter() - start, len(batch["task"]))
                for batch in ds.iter_batches(batch_size=CHUNK, batch_format="numpy", prefetch_batches=2)]  # fmt: skip

    with ThreadPoolExecutor(len(datasets)) as pool:
        return Pass(dict(zip(datasets, pool.map(drain, datasets.values()))))


def run(bench: DataBench) -> Report:
    out = str(Path(bench.out_dir).resolve() / "dataset")
    build_cfg = BuildConfig(out=out, synthetic=SyntheticConfig(users=bench.users, items=bench.items, queries=bench.queries))
    overrides = [*bench.overrides, f"data={out}", f"storage_path={Path(bench.out_dir).resolve() / 'storage'}",
                 f"max_steps={bench.train_steps}", "num_workers=1"]  # fmt: skip
    started_ray = not ray.is_initialized()
    if started_ray:  # as the trainer's driver does: enough logical CPUs for a worker and the tokenising tasks
        ray.init(include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()  # as train.run sets it for the trainer's pipelines
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True
    rounds: list[dict[str, Any]] = []
    try:
        for _ in range(bench.rounds):
            start = time.perf_counter()
            manifest = build(build_cfg)
            build_s = time.perf_counter() - start
            cfg = load_config(TrainConfig, bench.config, overrides)
            tokenised = _ray_data_pass(cfg)
            rows, _ = run_plain(cfg, plan(cfg), bench.train_steps)
            consumed = summarize(rows, bench.skip)
            rounds.append({
                "build_rows": sum(manifest["rows"].values()), "build_s": build_s,
                "tokenised": {t: sum(n for _, n in b) for t, b in tokenised.batches.items()},
                "ray_data_rows_per_s": tokenised.rows / tokenised.seconds, "ray_data_startup_s": tokenised.first_batch_s,
                "train_samples_per_s": consumed["samples_per_s"], "train_step_s": consumed["step_s"],
            })  # fmt: skip
    finally:
        if started_ray:
            ray.shutdown()
    return _report(bench, rounds, cfg)


def _report(bench: DataBench, rounds: list[dict[str, Any]], cfg: TrainConfig) -> Report:
    build_rate = median([r["build_rows"] / r["build_s"] for r in rounds])
    tokenise_rate = median([r["ray_data_rows_per_s"] for r in rounds])
    consume_rate = median([r["train_samples_per_s"] for r in rounds])
    ratios = {
        "ray_data_vs_train": median([r["ray_data_rows_per_s"] / r["train_samples_per_s"] for r in rounds]),
        "build_vs_train": median([r["build_rows"] / r["build_s"] / r["train_samples_per_s"] for r in rounds]),
    }
    startup = median([r["ray_data_startup_s"] for r in rounds])
    figures = {"build_rows_per_s": build_rate, "ray_data_rows_per_s": tokenise_rate,
               "train_samples_per_s": consume_rate, "ray_data_startup_s": startup, "build_rows": rounds[0]["build_rows"],
               "rounds": rounds}  # fmt: skip
    tables = [
        Table("Data rates vs training consumption", ["stage", "rows/s", "vs training"], [
            ["dataset build (synthetic, end to end)", fmt(build_rate), fmt(ratios["build_vs_train"]) + "x"],
            ["Ray Data read + tokenize + batch (start-up included)", fmt(tokenise_rate), fmt(ratios["ray_data_vs_train"]) + "x"],
            ["training consumption (plain loop samples/s)", fmt(consume_rate), "1x"],
        ]),
    ]  # fmt: skip
    config = bench.model_dump(mode="json") | {"train_config": cfg.model_dump(mode="json")}
    report = Report("data", config, ratios, figures, tables)
    report.notes = [
        f"{rounds[0]['build_rows']} rows built per round. Ray Data streams every task's train split to the end "
        f"({sum(rounds[0]['tokenised'].values())} rows) on all of this machine's cores (in a run it shares "
        f"them with the trainer), start-up included; every pipeline had delivered a first batch after {startup:.1f} s. "
        "A training sample is one query row (with its passages) or one generative row, as in metrics.jsonl."
    ]
    report.check(TARGETS)
    return report

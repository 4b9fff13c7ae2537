"""Each training config run for a few steps on this machine: seconds per step, tokens/s, FLOP share (MFU on a
GPU) and peak memory, the README's table of configs (litgpt's table, measured here rather than copied).

The figures are the run's own telemetry (``metrics.jsonl``, rank 0), medians over the steps after the warm-up;
the time outside the steps (Ray start, model load, first batches, checkpoint writes) is the run's wall time less
its steps'. A config whose run fails here (out of memory, most likely) is a row saying so, and the next one runs.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from recfound.artifacts import read_metrics
from recfound.bench import train as train_bench
from recfound.bench.common import CONFIG_DIR, Report, Table, fmt
from recfound.config import CommaList, Config, load_config
from recfound.train.config import TrainConfig

RUN_KEYS = ("max_steps", "checkpoint_every", "storage_path", "name")
"""What the benchmark sets for each run; refused as the user's overrides."""


class ConfigsBench(Config):
    """Seconds per step, tokens/s, FLOP share (MFU on GPU) and peak memory of each training config, trained for a
    few steps here: the README's table of configs."""

    configs: CommaList[str] = [str(CONFIG_DIR / f"{name}.yaml") for name in ("tiny", "smollm2", "quality")]
    """Training configs (jobs/train.py YAMLs), measured one after another."""
    data: str | None = None
    """Built dataset every config trains on (unset: each config's own data; null builds the synthetic default)."""
    train: list[str] = []
    """Overrides applied to every config, as train.<key>=value (e.g. train.tasks=[u2i]); not max_steps,
    checkpoint_every, storage_path or name, which the benchmark sets."""
    steps: int = Field(6, ge=2)
    """Optimizer steps of each run (a checkpoint is written after the last only)."""
    skip: int = Field(2, ge=0)
    """First steps left out as warm-up (allocator, streams starting, S2Sched's first round)."""
    storage: str = "runs/bench/configs"
    """storage_path of the benchmark's runs (each a fresh name)."""

    @model_validator(mode="after")
    def _runnable(self) -> ConfigsBench:
        """Refuse what would fail or mislead after the first (perhaps long) run: no step left to measure, an
        override the benchmark sets, a config that does not load with the overrides."""
        if self.skip >= self.steps:
            raise ValueError(f"skip={self.skip} leaves none of the {self.steps} steps to measure")
        for item in self.train:
            if item.partition("=")[0] in RUN_KEYS:
                raise ValueError(f"{item}: set by the benchmark for each run (steps=, storage=), not by an override")
        for path in self.configs:
            self.load(path, "check")
        return self

    def load(self, path: str, name: str) -> TrainConfig:
        data = [f"data={self.data}"] if self.data else []
        per_run = [f"max_steps={self.steps}", f"checkpoint_every={self.steps}", f"storage_path={self.storage}"]
        return load_config(TrainConfig, path, [*data, *self.train, *per_run, f"name={name}"])


def summarize(rows: list[dict[str, Any]], skip: int, wall_s: float) -> dict[str, Any]:
    """The train benchmark's medians over the steps after ``skip`` (rank 0's telemetry), with the run's highest
    peak memory and its time outside the steps."""
    return train_bench.summarize(rows, skip) | {
        "peak_mem_mb": max(r["peak_mem_mb"] for r in rows),
        "outside_steps_s": wall_s - sum(r["seconds"] for r in rows),
    }


def run(bench: ConfigsBench) -> Report:
    import ray
    from ray.train import TrainingFailedError

    from recfound.train.run import RunError
    from recfound.train.run import run as train_run

    stamp = f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"
    ours = not ray.is_initialized()
    results: dict[str, dict[str, Any]] = {}
    for path in bench.configs:
        cfg = bench.load(path, f"{Path(path).stem}-{stamp}")
        results[path] = {
            "backbone": cfg.model.backbone.name,
            "workers": cfg.num_workers,
            "per_worker": "1 GPU" if cfg.use_gpu else f"{cfg.cpus_per_worker:g} CPU",
        }
        started = time.perf_counter()
        try:
            checkpoint = Path(train_run(cfg))
            results[path] |= summarize(read_metrics(checkpoint), bench.skip, time.perf_counter() - started)
        except (RunError, TrainingFailedError) as err:
            results[path]["error"] = _first_line(err)
        finally:
            if ours:
                ray.shutdown()  # the next config starts its own Ray, sized by its own workers
    return _report(bench, results)


def _first_line(err: Exception) -> str:
    """The cause of a failed run in a table cell: Ray's errors open with a line or two of it, then pages of state."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:2])[:240] or type(err).__name__


def _row(path: str, r: dict[str, Any]) -> list[str]:
    head = [Path(path).name, r["backbone"], f"{r['workers']} x {r['per_worker']}"]
    if "error" in r:
        return [*head, "-", "-", "-", "-", "-", f"failed: {r['error']}"]
    share = f"{r[r['peak_label']]:.1%} {r['peak_label']}"
    figures = [fmt(r["step_s"]), fmt(r["tokens_per_s"]), share, f"{r['peak_mem_mb'] / 1024:.2f}"]
    return [*head, *figures, fmt(r["outside_steps_s"]), "ok"]


def _report(bench: ConfigsBench, results: dict[str, dict[str, Any]]) -> Report:
    headers = ["config", "backbone", "workers", "s/step", "tokens/s", "of peak", "peak GiB/worker", "outside steps s"]
    title = f"Training configs, {bench.steps} steps each (medians after {bench.skip})"
    return Report(
        benchmark="configs",
        config=bench.model_dump(mode="json"),
        ratios={},
        figures={"configs": results},
        tables=[Table(title, [*headers, "run"], [_row(path, r) for path, r in results.items()])],
    )

"""Smoke runs of jobs/benchmark.py: every subcommand at a minimal size runs and writes its ratios to JSON.

Nothing here asserts a timing (the figures are for the README's Performance section). One local Ray serves the
train, data and serve subcommands, and each Ray Data run streams a single task: pipelines cost start-up time on
2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import ray

pytestmark = pytest.mark.slow

JOB = Path(__file__).resolve().parents[1] / "jobs" / "benchmark.py"


@pytest.fixture(scope="module")
def benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_job", JOB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _run(benchmark: ModuleType, out: Path, *argv: str) -> dict[str, Any]:
    assert benchmark.main([*argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _assert_report(report: dict[str, Any], ratios: set[str]) -> None:
    assert ratios <= set(report["ratios"]), sorted(report["ratios"])
    assert all(math.isfinite(v) and v > 0 for k, v in report["ratios"].items() if k in ratios), report["ratios"]
    assert {"cpu", "cores", "torch", "ray", "transformers", "date"} <= set(report["machine"])
    assert report["config"] and report["targets"] and all(t["met"] is not None for t in report["targets"])


def test_help_lists_every_option(benchmark: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    for command, flag in (("adapter", "--backbone"), ("train", "--steps"), ("data", "--users"), ("serve", "--concurrency")):
        with pytest.raises(SystemExit) as exit_info:
            benchmark.main([command, "--help"])
        assert exit_info.value.code == 0 and flag in capsys.readouterr().out


def test_adapter(benchmark: ModuleType, tmp_path: Path) -> None:
    report = _run(benchmark, tmp_path / "adapter.json", "adapter", "--batch", "2", "--seq-len", "16", "--rounds", "2",
                  "--warmup", "1")  # fmt: skip
    _assert_report(report, {"tmole_vs_lora_train", "tmole_vs_frozen_train", "lora_vs_frozen_train",
                            "tmole_vs_lora_peak_memory", "folded_vs_expert_sum_infer", "folded_vs_lora_infer",
                            "expert_sum_vs_lora_infer"})  # fmt: skip
    assert report["figures"]["trainable_params"]["frozen"] == 0


def test_train(benchmark: ModuleType, local_ray: None, synthetic_dataset: Path, tmp_path: Path) -> None:
    report = _run(benchmark, tmp_path / "train.json", "train", "--steps", "3", "--skip", "1", "--storage",
                  str(tmp_path / "runs"), "--overrides", f"data={synthetic_dataset}", "tasks=[sentiment_analysis]",
                  "batch.embedding=0", "batch.generative=2")  # fmt: skip
    _assert_report(report, {"trainer_vs_plain_step", "trainer_vs_plain_wall", "trainer_vs_plain_time_per_token"})
    assert {"s2sched_share", "data_wait_share", "flop_share"} <= set(report["figures"])


def test_data(benchmark: ModuleType, local_ray: None, tmp_path: Path) -> None:
    report = _run(benchmark, tmp_path / "data.json", "data", "--users", "30", "--items", "20", "--queries", "10",
                  "--rounds", "1", "--train-steps", "2", "--skip", "0", "--out-dir", str(tmp_path / "data"),
                  "--overrides", "tasks=[u2i]", "batch.embedding=4", "batch.generative=0")  # fmt: skip
    _assert_report(report, {"ray_data_vs_train", "build_vs_train"})


def test_serve(benchmark: ModuleType, local_ray: None, tmp_path: Path) -> None:
    report = _run(benchmark, tmp_path / "serve.json", "serve", "--concurrency", "1", "2", "--requests", "4",
                  "--completion-requests", "2", "--max-tokens", "2", "--rounds", "1", "--breakdown-rounds", "2",
                  "--users", "30", "--items", "20",
                  "--out-dir", str(tmp_path / "serve"))  # fmt: skip
    levels = {f"{e}_serve_vs_direct_c{c}" for e in ("embeddings", "completions") for c in (1, 2)}
    _assert_report(report | {"targets": [t for t in report["targets"] if t["key"].endswith("c1")]}, levels)
    assert "embeddings_added_p50_ms_c1" in report["figures"]

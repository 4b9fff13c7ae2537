"""The step's FLOP estimate (the FLOP share / MFU in every training log line) against torch's own FLOP counter,
and the progress line itself."""

from __future__ import annotations

import logging
import posixpath
import uuid
from pathlib import Path

import pytest
import torch
from fsspec.core import url_to_fs
from test_loss_pin import TINY, joint_batch

from recfound.artifacts import TENSORBOARD_DIR
from recfound.bench.common import counted_flops
from recfound.config import load_config
from recfound.model.grm import GRM
from recfound.train.config import TrainConfig
from recfound.train.objective import JointObjective
from recfound.train.telemetry import StepCost, StepRecord, Telemetry, clock_text, peak_flops


def _step(layers: list[int] | None) -> tuple[float, float, StepCost]:
    """(StepCost's estimate, FlopCounterMode's count) of one forward + backward of the tiny model's joint step."""
    cfg = load_config(TrainConfig, str(TINY), [])
    adapter = cfg.model.adapter.model_copy(update={"layers_to_transform": layers})
    torch.manual_seed(0)
    grm = GRM.build(cfg.model.backbone, adapter.build(cfg.model.backbone))
    objective = JointObjective(grm, cfg.loss, cfg.batch.grad_cache_chunk)
    emb, gen = joint_batch(cfg)
    counted = counted_flops(lambda: objective(emb, gen)[0].backward())
    cost = StepCost.of(grm.tuner.model)
    return cost.batches(emb, gen), counted, cost


@pytest.mark.parametrize("layers", [None, [1]], ids=["every layer", "top layer"])
def test_step_cost_matches_torchs_flop_counter(layers: list[int] | None, one_thread: None) -> None:
    """Within 10 % of FlopCounterMode (which counts matmuls and attention, forward and backward, as they run);
    adapting only the top layer removes the lower layer's backward from both."""
    estimate, counted, cost = _step(layers)
    assert cost.backward_layers == (2 if layers is None else 1) and cost.layers == 2
    assert estimate == pytest.approx(counted, rel=0.1)


def test_progress_line_shows_step_of_total_mean_loss_and_an_eta_from_the_wall_clock(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Rank 0 logs one line every ``every`` steps: step/total, the tasks' mean loss and an ETA at the wall-clock
    rate since the first step (2 s a step here, though each step's own compute took 0.5 s: checkpoints and
    reports count), then the fields the cluster test parses (per-task losses) and the throughput figures."""
    ticks = iter(100.0 + 2.0 * i for i in range(5))
    telemetry = Telemetry(None, (1e12, "flop_share"), every=5, total=64, clock=lambda: next(ticks))
    with caplog.at_level(logging.INFO, logger="recfound.train.telemetry"):
        for step in range(1, 6):
            record = StepRecord(step, 1e-3, 0.5, 1000, 8, 1e11, {"u2i": 2.0, "q2i": 4.0}, {"u2i": 0.5, "q2i": 0.5})
            telemetry.log(record, world_size=2)
    [line] = caplog.messages
    assert line.startswith("step 5/64 | loss 3.000 | eta 1:58 | lr 1.00e-03 | 500 ms | 4,000 tok/s | ")
    assert "flop_share 20.0%" in line and line.endswith("u2i=2.000 q2i=4.000")
    assert clock_text(3725) == "1:02:05" and clock_text(59.6) == "1:00"


def test_a_cpu_peak_measured_under_load_is_measured_again_and_the_share_never_passes_one() -> None:
    """A GEMM peak measured while other work held the cores (here: an impossible 1 FLOP/s) is re-measured at the
    first step that beats it; the share stays a share."""
    telemetry = Telemetry(None, (1.0, "flop_share"), every=10, total=2)
    record = StepRecord(1, 1e-3, 0.5, 1000, 8, 1e9, {"u2i": 2.0}, {"u2i": 1.0})
    share = telemetry.log(record, world_size=1)["flop_share"]
    assert telemetry.peak >= 2e9 and 0 < share <= 1.0
    gpu = Telemetry(None, (1.0, "mfu"), every=10, total=2)  # a datasheet peak is never replaced
    assert gpu.log(record, world_size=1)["mfu"] == 2e9 and gpu.peak == 1.0


def test_the_cpu_peak_is_measured_in_the_runs_compute_dtype(monkeypatch) -> None:
    """A bf16 run's FLOP share is over a bf16 matmul's rate (about 4x float32's on a CPU with native bf16): against
    the float32 peak it would read over 100 %."""
    measured: list[torch.dtype] = []

    def fake_peak(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
        measured.append(dtype)
        return 4e9

    monkeypatch.setattr("recfound.train.telemetry.measured_gemm_peak", fake_peak)
    assert peak_flops(torch.device("cpu"), torch.bfloat16) == (4e9, "flop_share")
    telemetry = Telemetry(None, (1.0, "flop_share"), every=10, total=2, dtype=torch.bfloat16)
    telemetry.log(StepRecord(1, 1e-3, 0.5, 1000, 8, 1e9, {"u2i": 2.0}, {"u2i": 1.0}), world_size=1)
    assert measured == [torch.bfloat16, torch.bfloat16] and telemetry.peak == 4e9


def test_event_files_go_to_the_runs_storage_path(tmp_path: Path) -> None:
    """A local storage path is written in place; a remote one (here fsspec's memory://) gets the files copied at
    each sync, so a run's curves outlive the node of rank 0."""
    record = StepRecord(1, 1e-3, 0.5, 1000, 8, 1e9, {"u2i": 2.0}, {"u2i": 1.0})
    local = tmp_path / "runs" / "quality" / TENSORBOARD_DIR
    telemetry = Telemetry(str(local), (1e12, "flop_share"), every=10, total=1)
    telemetry.log(record, world_size=1)
    telemetry.close()
    assert [p.name.startswith("events.out.tfevents.") for p in local.iterdir()] == [True]

    remote = f"memory://bucket/runs/quality-{uuid.uuid4().hex[:6]}/{TENSORBOARD_DIR}"
    telemetry = Telemetry(remote, (1e12, "flop_share"), every=10, total=1)
    telemetry.log(record, world_size=1)
    telemetry.sync()
    fs, root = url_to_fs(remote)
    [copied] = fs.ls(root, detail=False)
    assert fs.cat_file(copied) == (telemetry._local / posixpath.basename(copied)).read_bytes()
    telemetry.close()

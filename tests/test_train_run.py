"""End-to-end training on local Ray: 2 gloo workers, per-task streams, the S2Sched actor, checkpoints, resume."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch

from recfound.config import load_config
from recfound.train.checkpoint import CorruptCheckpointError, load_model, verify
from recfound.train.config import TrainConfig
from recfound.train.engine import verify_rank
from recfound.train.run import NAMESPACE, RunError, run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> None:
    ray.init(num_cpus=3, include_dashboard=False)
    yield
    ray.shutdown()


def _cfg(data: Path, storage: Path, *overrides: str) -> TrainConfig:
    # Four tasks (both modes, both kinds of embedding input) keep Ray Data's per-task pipelines few on 2 cores.
    base = [
        f"data={data}",
        f"storage_path={storage}",
        "checkpoint_every=4",
        "log_every=2",
        "scheduler.warmup=2",
        "tasks=[u2i,i2i,sentiment_analysis,sequential_recommendation]",
    ]
    return load_config(TrainConfig, str(CONFIGS / "tiny.yaml"), base + list(overrides))


def _smallest_read_by_workers(data: Path) -> str:
    """A ``batch.small_task_rows`` under which the workers read the smallest of ``_cfg``'s tasks themselves and the
    others stream through Ray Data, split across the workers: a resume then covers both kinds of stream."""
    built = json.loads((data / "manifest.json").read_text())["tasks"]
    rows = sorted(built[t]["train"] for t in ("u2i", "i2i", "sentiment_analysis", "sequential_recommendation"))
    assert rows[0] < rows[-1], rows
    return f"batch.small_task_rows={rows[0]}"


def _scheduler_steps(ckpt: Path) -> list[int]:
    return [row["step"] for row in json.loads((ckpt / "s2sched.json").read_text())["weights_history"]]


def _history(ckpt: Path) -> list[dict]:
    return [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(storage: Path, name: str) -> dict[int, Path]:
    """The run's checkpoints in storage by step."""
    found = {}
    for path in (storage / name).glob("checkpoint_*/trainer_state.json"):
        found[json.loads(path.read_text())["step"]] = path.parent
    return found


def _tear(ckpt: Path) -> None:
    """Make a checkpoint fail verification (its trainer_state.json no longer matches checkpoint.json's SHA-256)."""
    state = ckpt / "trainer_state.json"
    state.write_bytes(state.read_bytes().replace(b'"seed"', b'"seeds"', 1))


def test_two_workers_train_checkpoint_and_resume(synthetic_dataset: Path, tmp_path: Path) -> None:
    """Train 6 steps, checkpointing every 2; tear the step-6 and step-4 checkpoints, so a rerun resumes from step 2:
    its steps 3-6 must repeat the uninterrupted run's (restored adapter, AdamW and LR schedule, stream positions of
    the Ray Data streams and of the worker-read small tasks, sampler carry, S2Sched state, dropout seeds). Then
    raising max_steps resumes from the new step 6."""
    streaming = _smallest_read_by_workers(synthetic_dataset)
    cfg = _cfg(
        synthetic_dataset, tmp_path, "name=run-a", "max_steps=6", "num_workers=2", "checkpoint_every=2", streaming
    )
    ckpt = Path(run(cfg))
    verify(ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 6
    uninterrupted = _history(ckpt)
    assert [row["step"] for row in uninterrupted] == list(range(1, 7))
    assert {t for row in uninterrupted for t in row["losses"]} == {
        "u2i",
        "i2i",
        "sentiment_analysis",
        "sequential_recommendation",
    }
    assert uninterrupted[-1]["losses"]["u2i"] < uninterrupted[0]["losses"]["u2i"]
    assert all(row["tokens_per_s"] > 0 and row["peak_mem_mb"] > 50 for row in uninterrupted)
    for row in uninterrupted:  # each step's rows per task, over both workers: the tasks it has losses for
        assert set(row["rows"]) == set(row["losses"]), row["step"]
        embedding = sum(n for t, n in row["rows"].items() if t in {"u2i", "i2i"})
        assert (embedding, sum(row["rows"].values()) - embedding) == (2 * cfg.batch.embedding, 2 * cfg.batch.generative)
    assert (ckpt / "losses.png").stat().st_size > 0 and (ckpt / "weights.png").stat().st_size > 0
    assert list((tmp_path / "run-a" / "tensorboard").glob("events.out.tfevents.*"))  # beside the checkpoints
    weights = json.loads((ckpt / "s2sched.json").read_text())["weights_history"]
    assert weights[-1]["weights"] != weights[0]["weights"]  # past warmup the mix moved
    grm = load_model(str(ckpt))
    vectors = grm.embed(
        {"input_ids": [[5, 6, 7]], "attention_mask": [[1, 1, 1]], "text_mask": [[0, 1, 1]]}, grm.task_ids(["u2i"])
    )
    assert vectors.shape[0] == 1

    # Torn newest checkpoints: the rerun falls back to the step-2 one instead of failing, and retrains steps 3-6.
    checkpoints = _checkpoints(tmp_path, "run-a")
    assert set(checkpoints) == {2, 4, 6}
    _tear(checkpoints[6])
    _tear(checkpoints[4])
    fallback = Path(run(cfg))
    assert fallback not in checkpoints.values()
    resumed = _history(fallback)
    assert [row["step"] for row in resumed] == list(range(1, 7))
    assert resumed[:2] == uninterrupted[:2]  # restored from the step-2 checkpoint, timings and all
    for got, want in zip(resumed[2:], uninterrupted[2:]):
        assert got["seconds"] != want["seconds"], f"step {got['step']} was not retrained"
        assert (got["lr"], got["tokens"], got["samples"]) == (want["lr"], want["tokens"], want["samples"]), got["step"]
        # Same data, seeds, state and worker count: observed bit-equal (losses and S2Sched weights, 2 runs). 1e-5
        # leaves room for a reduction order that differs on another machine; a shifted stream (other rows), lost
        # Adam moments or a wrong LR (steps 4-6, after the first update from restored state) move losses that are
        # changing by 1e-2-1e-1 a step far more than that.
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-5), got["step"]
        assert got["weights"] == pytest.approx(want["weights"], rel=1e-5), got["step"]

    # Re-running with a higher max_steps resumes from step 6 instead of starting over, S2Sched history continuous.
    longer = Path(run(cfg.model_copy(update={"max_steps": 8})))
    history = _history(longer)
    assert [row["step"] for row in history] == list(range(1, 9)) and history[:6] == resumed
    steps = _scheduler_steps(longer)
    assert steps == sorted(steps) and steps[: len(_scheduler_steps(fallback))] == _scheduler_steps(fallback)


def _losses(ckpt: Path) -> list[dict[str, float]]:
    return [json.loads(line)["losses"] for line in (ckpt / "metrics.jsonl").read_text().splitlines()]


def test_zero_stages_follow_the_ddp_loss_curve_and_resume(synthetic_dataset: Path, tmp_path: Path) -> None:
    """DeepSpeed ZeRO (gloo on CPU) moves optimizer state, gradients and weights around, not the optimisation:
    every step's per-task losses and the final adapter match DDP's up to reduction order. The ZeRO-2 run stops
    at step 2 and is resumed from its partitioned checkpoint, so its steps 3-4 also prove an exact restore."""
    shared = ("num_workers=2", "checkpoint_every=2", "tasks=[u2i,sentiment_analysis]")
    ddp = Path(run(_cfg(synthetic_dataset, tmp_path, "name=ddp", "max_steps=4", *shared)))
    run(_cfg(synthetic_dataset, tmp_path, "name=zero2", "max_steps=2", "zero_stage=2", *shared))
    zero2 = Path(run(_cfg(synthetic_dataset, tmp_path, "name=zero2", "max_steps=4", "zero_stage=2", *shared)))
    zero3 = Path(run(_cfg(synthetic_dataset, tmp_path, "name=zero3", "max_steps=4", "zero_stage=3", *shared)))

    reference = _losses(ddp)
    assert len(reference) == 4 and reference[-1]["u2i"] < reference[0]["u2i"]
    ddp_adapter = load_model(str(ddp)).tuner.trainable_state_dict()
    for ckpt in (zero2, zero3):
        losses = _losses(ckpt)
        assert [row.keys() for row in losses] == [row.keys() for row in reference]
        for got, want in zip(losses, reference):
            assert got == pytest.approx(want, rel=1e-4), (ckpt.parent.name, got, want)
        adapter = load_model(str(ckpt)).tuner.trainable_state_dict()  # ZeRO-3 saved it gathered, not a shard
        for name, tensor in ddp_adapter.items():
            # Float reduction order differs; Adam's g / sqrt(v) magnifies it where a gradient is near 0 (2.3e-5 seen
            # on 1 of 1536 entries with shuffled batches, 4e-6 before). 4 Adam steps at lr 1e-3 move a weight up to
            # 4e-3, so 5e-5 still tells a wrong update from float noise.
            torch.testing.assert_close(
                adapter[name], tensor, rtol=1e-4, atol=5e-5, msg=lambda m, n=name: f"{ckpt.parent.name} {n}: {m}"
            )
        for rank in (0, 1):
            verify_rank(ckpt, rank)
    shard = next(p for p in (zero2 / "zero").rglob("*optim_states.pt") if "rank_1" in p.name)
    shard.write_bytes(b"torn")
    with pytest.raises(CorruptCheckpointError, match="does not match its SHA-256 in rank-1.json"):
        verify_rank(zero2, 1)


def test_zero_configs_are_rejected_before_ray() -> None:
    with pytest.raises(ValueError, match="elastic training"):
        TrainConfig(zero_stage=2, num_workers=2, min_workers=1)
    with pytest.raises(ValueError, match="source=valid needs zero_stage < 3"):
        TrainConfig.model_validate({"zero_stage": 3, "scheduler": {"source": "valid"}})


def _kill_a_worker_after_first_checkpoint(storage: Path, name: str, done: threading.Event) -> None:
    """SIGKILL one training worker process once the run has a complete checkpoint (a real crash, not an exception).

    The local Ray started by this module runs as children of this process, so the workers are found among our own
    descendants (no state API, and never another session's processes)."""
    deadline = time.time() + 240
    while time.time() < deadline and not list((storage / name).glob("checkpoint_*/checkpoint.json")):
        time.sleep(0.5)
    workers = [p for p in psutil.Process().children(recursive=True) if "RayTrainWorker" in " ".join(_cmdline(p))]
    if workers:
        os.kill(workers[-1].pid, signal.SIGKILL)
        done.set()


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def test_killed_worker_restarts_from_checkpoint(synthetic_dataset: Path, tmp_path: Path) -> None:
    cfg = _cfg(synthetic_dataset, tmp_path, "name=run-f", "max_steps=14", "num_workers=2", "max_failures=2")
    killed = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(tmp_path, "run-f", killed))
    killer.start()
    ckpt = Path(run(cfg))
    killer.join()
    assert killed.is_set()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 14
    steps = _scheduler_steps(ckpt)
    assert steps == sorted(set(steps))  # continuous: no step recorded twice, none going back


def test_killed_scheduler_actor_resumes_with_a_continuous_history(synthetic_dataset: Path, tmp_path: Path) -> None:
    """Ray restarts the killed S2Sched actor empty; it refuses calls until restored (SchedulerLostState), so the
    workers fail over to the last checkpoint, whose scheduler state is loaded back: the run completes with every
    scheduler update recorded once and in order, none lost to the restart."""
    cfg = _cfg(synthetic_dataset, tmp_path, "name=run-s", "max_steps=14", "num_workers=2", "max_failures=2")
    killed = threading.Event()

    def kill_scheduler() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not list((tmp_path / "run-s").glob("checkpoint_*/checkpoint.json")):
            time.sleep(0.5)
        ray.kill(ray.get_actor("s2sched-run-s", namespace=NAMESPACE), no_restart=False)
        killed.set()

    killer = threading.Thread(target=kill_scheduler)
    killer.start()
    ckpt = Path(run(cfg))
    killer.join()
    assert killed.is_set()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 14
    steps = _scheduler_steps(ckpt)
    assert steps == sorted(set(steps)) and steps[-1] == 14 and len(steps) == 14 // cfg.scheduler.update_interval


def test_non_finite_loss_stops_with_step_and_task(synthetic_dataset: Path, tmp_path: Path) -> None:
    cfg = _cfg(synthetic_dataset, tmp_path, "name=run-nan", "max_steps=3", "num_workers=1", "loss.temperature=1e-300")
    with pytest.raises(RunError, match=r"stopped: step 1: loss of task \w+ is (nan|inf)"):
        run(cfg)


def test_scheduler_reads_validation_losses(synthetic_dataset: Path, tmp_path: Path) -> None:
    """source=valid: S2Sched is fed losses re-measured on fixed validation batches, not the training batch's.
    (With the logQ-corrected contrastive loss on, so its popularity prior reaches the worker.)"""
    cfg = _cfg(
        synthetic_dataset,
        tmp_path,
        "name=run-v",
        "max_steps=4",
        "num_workers=1",
        "scheduler.source=valid",
        "scheduler.valid_batches=1",
        "loss.logq_tasks=[u2i]",
    )
    ckpt = Path(run(cfg))
    state = json.loads((ckpt / "s2sched.json").read_text())
    train_losses = [json.loads(line)["losses"] for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert len(train_losses) == 4
    # Every task is measured at every update (a training batch need not hold every task), on other rows.
    assert {task: len(points) for task, points in state["losses"].items()} == {t: 4 for t in state["tasks"]}
    first = {task: points[0][1] for task, points in state["losses"].items()}
    assert all(first[t] != loss for t, loss in train_losses[0].items())

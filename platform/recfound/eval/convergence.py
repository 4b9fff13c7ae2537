"""How evenly a training run's tasks converged, read from the per-step losses in its ``metrics.jsonl``.

S2Sched exists to make tasks converge together, so its effect shows in two numbers per run: the step at which
each task's loss first falls to a target fraction of its initial loss, and the spread of those steps across
tasks (small spread = balanced). Training losses are per-batch and noisy, so both the initial loss and the
curve are trailing means over ``window`` recorded steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from recfound.artifacts import METRICS
from recfound.tasks import TASK_ID

CHECKPOINT_GLOB = "checkpoint_*"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``checkpoint_*`` directory of a Ray Train run directory (its names sort by creation time)."""
    found = sorted(p for p in run_dir.glob(CHECKPOINT_GLOB) if p.is_dir())
    return found[-1] if found else None


def find_history(path: Path) -> Path | None:
    """``metrics.jsonl`` itself, inside a checkpoint, or inside a run directory's latest checkpoint (the newest
    checkpoint holds the whole history so far)."""
    if path.is_file():
        return path if path.name == METRICS else None
    if (path / METRICS).is_file():
        return path / METRICS
    latest = latest_checkpoint(path)
    return latest / METRICS if latest is not None and (latest / METRICS).is_file() else None


@dataclass(frozen=True)
class TaskConvergence:
    initial: float
    """Mean loss over the task's first ``window`` recorded steps."""
    final: float
    """Mean loss over its last ``window`` recorded steps."""
    step: int | None
    """First step whose trailing mean is at most target x initial; None when it never got there."""
    rows: int | None = None
    """Rows of the task the run trained on (all ranks, all steps); None for a history that does not record them."""

    @property
    def ratio(self) -> float:
        return self.final / self.initial if self.initial else math.nan


def loss_series(history: Sequence[dict], task: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, losses) of the records where ``task`` was trained (S2Sched may leave a task out of a step)."""
    points = [(row["step"], row["losses"][task]) for row in history if math.isfinite(row["losses"].get(task, math.nan))]
    steps, losses = zip(*points) if points else ((), ())
    return np.asarray(steps, dtype=np.int64), np.asarray(losses, dtype=np.float64)


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each position from ``window - 1`` on (full windows only)."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    return (sums[window:] - sums[:-window]) / window


def _tasks(history: Sequence[dict]) -> list[str]:
    """The tasks with losses in the history, in task-id order (unknown names last, by name)."""
    return sorted({task for row in history for task in row["losses"]}, key=lambda t: (TASK_ID.get(t, len(TASK_ID)), t))


def _rows(history: Sequence[dict], task: str) -> int | None:
    if not all("rows" in row for row in history):
        return None
    return sum(row["rows"].get(task, 0) for row in history)


def task_convergence(history: Sequence[dict], target: float = 0.8, window: int = 5) -> dict[str, TaskConvergence]:
    """Per task with at least ``window`` recorded losses: initial and final loss and the step reaching target."""
    out = {}
    for task in _tasks(history):
        steps, losses = loss_series(history, task)
        if losses.size < window:
            continue
        smooth = trailing_mean(losses, window)
        reached = np.flatnonzero(smooth <= target * smooth[0])
        step = int(steps[window - 1 + reached[0]]) if reached.size else None
        out[task] = TaskConvergence(float(smooth[0]), float(smooth[-1]), step, _rows(history, task))
    return out


def balance(tasks: dict[str, TaskConvergence]) -> dict[str, float | int | None]:
    """Task balance: how many tasks reached the target, the first and last to do so and the spread between them
    (steps), and the standard deviation of final/initial loss across tasks (defined even when none converged)."""
    steps = [c.step for c in tasks.values() if c.step is not None]
    ratios = [c.ratio for c in tasks.values() if math.isfinite(c.ratio)]
    return {
        "converged": len(steps),
        "total": len(tasks),
        "first": min(steps, default=None),
        "last": max(steps, default=None),
        "spread": max(steps) - min(steps) if steps else None,
        "mean_ratio": float(np.mean(ratios)) if ratios else None,
        "ratio_std": float(np.std(ratios)) if ratios else None,
    }


def summarize(history: Sequence[dict], target: float = 0.8, window: int = 5) -> dict:
    """JSON-ready convergence report of one run (what results.json stores and compare mode reads back)."""
    tasks = task_convergence(history, target, window)
    return {
        "target": target,
        "window": window,
        "steps": max((row["step"] for row in history), default=0),
        "tasks": {task: asdict(c) | {"ratio": c.ratio} for task, c in tasks.items()},
        "balance": balance(tasks),
    }


def mean_normalised_loss(history: Sequence[dict], window: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(steps, mean over tasks of trailing-mean loss / initial loss): one curve per run, comparable across
    schedulers because each task is measured against its own start. A step averages the tasks it recorded a loss
    for, so a scheduler that skips tasks gives a noisier curve."""
    curves: dict[int, list[float]] = {}
    for task in _tasks(history):
        steps, losses = loss_series(history, task)
        if losses.size < window:
            continue
        smooth = trailing_mean(losses, window)
        for step, value in zip(steps[window - 1 :], smooth / smooth[0]):
            curves.setdefault(int(step), []).append(float(value))
    steps = np.array(sorted(curves), dtype=np.int64)
    return steps, np.array([np.mean(curves[s]) for s in steps])


def plot_runs(histories: dict[str, Sequence[dict]], out: Path, window: int = 5) -> Path:
    """One line per run of ``mean_normalised_loss``: the scheduler comparison at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, history in histories.items():
        ax.plot(*mean_normalised_loss(history, window), label=label)
    ax.set(title=f"mean per-task loss / initial loss (trailing mean of {window})", xlabel="step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out

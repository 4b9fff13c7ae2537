"""S2Sched: step-wise, convergence-oriented task weights for sample scheduling (RecFound, after CoBa).

Every step carries an embedding part and a generative part, so the two task groups are scheduled separately and
each group's weights sum to 1. Weights pick how many samples of each task enter the next batch (see
``recfound.train.mixing.allocate``); they never scale the loss.

The maths follows CoBa (Gong et al. 2024, "CoBa: Convergence Balancer for Multitask Finetuning of LLMs") as
RecFound uses it. Per group of G tasks, at each recompute:

* ``L̃_t`` — task t's loss divided by its first reported loss, so tasks of different loss scale compare.
* ``k_t`` — slope of a least-squares line through the last ``history`` values of ``L̃_t`` (x = step).
* RCS (relative convergence) ``softmax(G · k / Σ_t |k_t|)``: a task converging slower than its peers
  (flatter or rising curve) gets more.
* ACS (absolute convergence) ``softmax_t(−N · k_t[last] / Σ_j |k_t[j]|)`` where ``k_t[·]`` is task t's own
  slope history (last ``history`` recomputes, N of them). The denominator runs over the history axis of the
  one task, as in CoBa's reference code, so ACS compares each task's current slope with its own past: a task
  still descending steadily is favoured, one that flattened out or turned upward (overfitting) loses weight.
* DF (divergence factor) ``min(L · softmax(τ · (−L · m / Σ_j |m_j|))[last], 1)`` where ``m`` is the full slope
  history (since warmup, length L) of the group's max-over-tasks ``L̃`` curve. While the worst task still
  descends as fast as before DF stays at 1 and RCS decides; once it flattens or rises DF drops and ACS takes
  over, steering away from diverging tasks.
* ``w = softmax(G · (DF · RCS + (1 − DF) · ACS))``, times the data-size prior rows / mean rows of the group
  (``size_prior``), L1-normalised, then floored at ``1 / (floor_scale · G)`` by ``w ← w · (1 − G · floor) + floor``
  (which keeps the sum at 1) whenever some weight is below the floor, so no task starves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

import numpy as np
import ray
from pydantic import Field

from recfound.config import Config
from recfound.tasks import Mode, mode_of


class ScheduleMode(str, Enum):
    """How per-task weights are chosen inside each task group."""

    UNIFORM = "uniform"
    SIZE_PROPORTIONAL = "size_proportional"
    S2SCHED = "s2sched"


class LossSource(str, Enum):
    """Where the per-task losses fed to the scheduler come from."""

    TRAIN = "train"
    VALID = "valid"


class SchedulerConfig(Config):
    """Sample scheduling across tasks (S2Sched and its baselines)."""

    mode: ScheduleMode = ScheduleMode.S2SCHED
    """uniform: every task of a group equally often; size_proportional: in proportion to task rows (big tasks
    dominate, small ones nearly vanish); s2sched: convergence-driven weights that shift samples to tasks that lag."""
    update_interval: int = Field(1, ge=1)
    """Recompute weights every this many steps. Larger is cheaper (fewer validation passes with source=valid) but
    reacts later; the paper recomputes every step."""
    history: int = Field(64, ge=2)
    """Window (in recorded losses, and in recomputes for the slope history) of the least-squares slopes. Longer
    windows smooth noisy per-batch losses but lag behind a changing curve."""
    warmup: int = Field(32, ge=0)
    """Steps with uniform weights before S2Sched starts; the first losses are too few and too noisy for slopes."""
    tau: float = Field(1.0, gt=0)
    """Temperature of the divergence factor. Higher makes DF react more sharply when the worst task's descent
    slows, handing control to the absolute score sooner."""
    source: LossSource = LossSource.TRAIN
    """train: reuse the per-task losses of the training batch (free, but noisier and biased by what the batch
    just learned); valid: re-measure on a few validation batches each update (cleaner, costs forward passes)."""
    valid_batches: int = Field(4, ge=1)
    """Validation batches per update when source=valid. The paper uses 128 (slow); a few are usually enough
    because the slope fit averages over `history` updates anyway."""
    size_prior: bool = True
    """Multiply the convergence weights by task rows / the group's mean rows (the paper's data-size prior). On, a
    task with 10x the rows gets about 10x the samples while both converge alike, so the prior, not the convergence
    scores, sets most of the mix when task sizes differ widely (docs/evaluation.md, S2Sched vs uniform); off, the
    convergence scores alone decide and a small task is drawn as often as a large one. Off on the Magazine slice
    (three seeds): Q2I full NDCG@10 +0.045, U2I -0.013, I2I -0.024, the same way in every seed."""
    floor_scale: float = Field(5.0, ge=1)
    """Weight floor is 1/(floor_scale * G) in a group of G tasks. Smaller values guarantee every task more
    samples (1 means uniform); larger ones give the scheduler more freedom to starve a task."""


_Points = list[list[float]]  # [[step, value], ...]: JSON-friendly, unlike tuples


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _scaled(values: np.ndarray, scale: float) -> np.ndarray:
    """``scale · values / Σ|values|``, zero when all values are zero (flat curves carry no signal)."""
    total = np.abs(values).sum()
    return np.zeros_like(values) if total == 0 else scale * values / total


def _slope(points: _Points) -> float:
    """Least-squares slope of value over step; 0 with fewer than two points."""
    if len(points) < 2:
        return 0.0
    x, y = np.asarray(points, dtype=np.float64).T
    dx = x - x.mean()
    return float((dx * (y - y.mean())).sum() / (dx * dx).sum())


def _group_weights(
    slopes: list[list[float]], max_slopes: list[float], rows: np.ndarray, tau: float, floor_scale: float
) -> np.ndarray:
    """One group's S2Sched weights from per-task slope histories (current slope last) and the max-curve's."""
    g = len(slopes)
    current = np.array([s[-1] for s in slopes])
    rcs = _softmax(_scaled(current, g))
    acs = _softmax(np.array([_scaled(np.array(s), -len(s))[-1] for s in slopes]))
    m = np.array(max_slopes)
    df = min(_softmax(tau * _scaled(m, -len(m)))[-1] * len(m), 1.0)
    w = _softmax(g * (df * rcs + (1 - df) * acs)) * rows / rows.mean()
    w /= w.sum()
    floor = 1.0 / (floor_scale * g)
    if (w < floor).any():
        w = w * (1 - g * floor) + floor
    return w


class S2Sched:
    """Per-task sample weights for the embedding and the generative group, updated from per-task losses.

    Pure state machine: feed ``update(step, losses)`` once per step with whatever tasks reported; tasks that have
    not reported keep their last curve (a never-seen task counts as flat). ``state_dict`` is JSON-serialisable
    and restores the exact sequence of future weights.
    """

    def __init__(self, tasks: Sequence[str], rows: Mapping[str, int], cfg: SchedulerConfig) -> None:
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be non-empty and unique, got {list(tasks)}")
        for t in tasks:
            if rows.get(t, 0) <= 0:
                raise ValueError(f"task {t!r} needs a positive row count for the data-size prior, got {rows.get(t)}")
        self.tasks = tuple(tasks)
        self.cfg = cfg
        self.rows = {t: int(rows[t]) for t in self.tasks}
        modes = {t: mode_of(t) for t in self.tasks}
        self.groups = {m: tuple(t for t in self.tasks if modes[t] is m) for m in Mode if m in modes.values()}
        self.step = -1
        """Last step passed to ``update``; -1 before the first."""
        self.version = -1
        """Step at which ``weights`` were computed; -1 for the initial weights."""
        self.initial: dict[str, float] = {}
        self.losses: dict[str, _Points] = {t: [] for t in self.tasks}
        self.slopes: dict[str, list[float]] = {t: [] for t in self.tasks}
        self.group_max: dict[Mode, _Points] = {g: [] for g in self.groups}
        self.max_slopes: dict[Mode, list[float]] = {g: [] for g in self.groups}
        self.weights = self._static_weights()
        self.weights_history: list[dict[str, Any]] = []
        """Every recompute as ``{"step", "weights"}``: what training writes to ``s2sched.json``."""

    def _static_weights(self) -> dict[str, float]:
        """Weights that do not depend on losses: size-proportional for that mode, else uniform per group."""
        out: dict[str, float] = {}
        for group in self.groups.values():
            if self.cfg.mode is ScheduleMode.SIZE_PROPORTIONAL:
                total = sum(self.rows[t] for t in group)
                out.update({t: self.rows[t] / total for t in group})
            else:
                out.update({t: 1.0 / len(group) for t in group})
        return {t: out[t] for t in self.tasks}

    def _record(self, step: int, losses: Mapping[str, float]) -> None:
        for task, loss in losses.items():
            if task not in self.losses:
                raise ValueError(f"step {step}: unknown task {task!r}; scheduled tasks: {', '.join(self.tasks)}")
            if not math.isfinite(loss):
                raise ValueError(f"step {step}: loss of task {task!r} is not finite ({loss})")
            if task not in self.initial and loss <= 0:
                raise ValueError(f"step {step}: first loss of task {task!r} must be > 0 to normalise by, got {loss}")
        for task, loss in losses.items():
            first = self.initial.setdefault(task, float(loss))
            self.losses[task] = (self.losses[task] + [[step, float(loss) / first]])[-self.cfg.history :]
        for mode, group in self.groups.items():
            latest = [self.losses[t][-1][1] for t in group if self.losses[t]]
            if latest:
                self.group_max[mode] = (self.group_max[mode] + [[step, max(latest)]])[-self.cfg.history :]

    def _recompute(self) -> dict[str, float]:
        for t in self.tasks:
            self.slopes[t] = (self.slopes[t] + [_slope(self.losses[t])])[-self.cfg.history :]
        out: dict[str, float] = {}
        for mode, group in self.groups.items():
            self.max_slopes[mode].append(_slope(self.group_max[mode]))
            w = _group_weights(
                [self.slopes[t] for t in group],
                self.max_slopes[mode],
                np.array([self.rows[t] if self.cfg.size_prior else 1 for t in group], dtype=np.float64),
                self.cfg.tau,
                self.cfg.floor_scale,
            )
            out.update(zip(group, w.tolist(), strict=True))
        return {t: out[t] for t in self.tasks}

    def update(self, step: int, losses: Mapping[str, float]) -> dict[str, float]:
        """Record this step's per-task losses; return the weights of every task (each group sums to 1).

        Weights are recomputed once ``step >= warmup`` and at least ``update_interval`` steps after the last
        recompute; otherwise the current weights are returned unchanged. Steps must increase.
        """
        if step <= self.step:
            raise ValueError(f"step {step}: steps must increase; last update was step {self.step}")
        self._record(step, losses)
        self.step = step
        if self.version >= 0 and step - self.version < self.cfg.update_interval:
            return dict(self.weights)
        if self.cfg.mode is ScheduleMode.S2SCHED and step >= self.cfg.warmup:
            self.weights = self._recompute()
        self.version = step
        self.weights_history.append({"step": step, "weights": dict(self.weights)})
        return dict(self.weights)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable snapshot; ``load_state_dict`` of it continues bit-identically."""
        return {
            "tasks": list(self.tasks),
            "step": self.step,
            "version": self.version,
            "initial": dict(self.initial),
            "losses": {t: [list(p) for p in v] for t, v in self.losses.items()},
            "slopes": {t: list(v) for t, v in self.slopes.items()},
            "group_max": {g.value: [list(p) for p in v] for g, v in self.group_max.items()},
            "max_slopes": {g.value: list(v) for g, v in self.max_slopes.items()},
            "weights": dict(self.weights),
            "weights_history": [{"step": h["step"], "weights": dict(h["weights"])} for h in self.weights_history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict``; the task set must match (rows and config come from the constructor)."""
        if list(state["tasks"]) != list(self.tasks):
            raise ValueError(f"scheduler state is for tasks {state['tasks']}, this scheduler has {list(self.tasks)}")
        self.step = int(state["step"])
        self.version = int(state["version"])
        self.initial = {t: float(v) for t, v in state["initial"].items()}
        self.losses = {t: [[int(s), float(v)] for s, v in state["losses"][t]] for t in self.tasks}
        self.slopes = {t: [float(v) for v in state["slopes"][t]] for t in self.tasks}
        self.group_max = {g: [[int(s), float(v)] for s, v in state["group_max"][g.value]] for g in self.groups}
        self.max_slopes = {g: [float(v) for v in state["max_slopes"][g.value]] for g in self.groups}
        self.weights = {t: float(state["weights"][t]) for t in self.tasks}
        self.weights_history = [
            {"step": int(h["step"]), "weights": {t: float(w) for t, w in h["weights"].items()}}
            for h in state["weights_history"]
        ]


class SchedulerLostState(RuntimeError):
    """The scheduler actor was restarted by Ray and holds no history until ``load_state_dict`` is called."""


class _SchedulerActor:
    """Ray actor around one ``S2Sched``: the single source of weights every training worker reads.

    After a crash Ray restarts the actor with empty history. Rather than silently serve warmup-uniform weights,
    it refuses every call except ``load_state_dict`` until the trainer restores the last checkpoint's state.
    """

    def __init__(self, tasks: Sequence[str], rows: Mapping[str, int], cfg: SchedulerConfig) -> None:
        self._sched = S2Sched(tasks, rows, cfg)
        self._lost = ray.get_runtime_context().was_current_actor_reconstructed

    def _check(self) -> S2Sched:
        if self._lost:
            raise SchedulerLostState("scheduler actor restarted: call load_state_dict with the last saved state")
        return self._sched

    def update(self, step: int, losses: Mapping[str, float]) -> tuple[int, dict[str, float]]:
        sched = self._check()
        weights = sched.update(step, losses)
        return sched.version, weights

    def weights(self) -> tuple[int, dict[str, float]]:
        sched = self._check()
        return sched.version, dict(sched.weights)

    def state_dict(self) -> dict[str, Any]:
        return self._check().state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._sched.load_state_dict(state)
        self._lost = False


S2SchedActor = ray.remote(num_cpus=0, max_restarts=-1)(_SchedulerActor)
"""Restartable (``max_restarts=-1``), CPU-free actor class; create it through ``get_or_create_scheduler``."""


def get_or_create_scheduler(
    name: str,
    namespace: str,
    tasks: Sequence[str],
    rows: Mapping[str, int],
    cfg: SchedulerConfig,
    state: Mapping[str, Any] | None = None,
) -> ray.actor.ActorHandle:
    """Handle to the named scheduler actor, creating it if absent; every worker may call this concurrently.

    An existing actor keeps its tasks, rows and config. ``state`` (a checkpoint's ``state_dict``) is loaded into
    the actor whether it was just created or already running, so a resumed run continues from its checkpoint.
    """
    actor = S2SchedActor.options(name=name, namespace=namespace, get_if_exists=True).remote(
        tuple(tasks), dict(rows), cfg
    )
    if state is not None:
        ray.get(actor.load_state_dict.remote(state))
    return actor

"""What the driver hands each Ray Train worker (``WorkerArgs``) and the function the worker runs.

The driver imports this module to name that function, not train/loop.py: the loop imports the model code (peft,
transformers' model classes: about 3 s of a run's start-up on 2 cores) that only the workers use.
"""

from __future__ import annotations

from dataclasses import dataclass

from recfound.train.config import TrainConfig
from recfound.train.popularity import ItemPrior


@dataclass(frozen=True)
class WorkerArgs:
    """What the driver hands every worker, pickled once by Ray Train (as ``train_loop_config={"args": ...}``)."""

    cfg: TrainConfig
    tasks: list[str]
    """The run's tasks, in the plan's order (every rank steps through them alike)."""
    data: str
    """The built dataset (validation batches are read from it when ``scheduler.source=valid``)."""
    scheduler: str
    """Name of the S2Sched actor, which rank 0 asks for the task mix."""
    namespace: str
    scheduler_initial: dict
    """The scheduler's state at the run's start: a restart before the first checkpoint restores it."""
    halt: str
    """Where rank 0 records why it stopped the run (a non-finite loss), for the driver to raise."""
    tensorboard: str
    prior: ItemPrior | None
    """The items' popularity prior when some task is logQ-corrected (``loss.logq_tasks``)."""
    small_tasks: list[str]
    """Tasks each worker reads itself (``batch.small_task_rows``); the others are Ray Data datasets named by task."""


def train_worker(config: dict[str, WorkerArgs]) -> None:
    """Ray Train's ``train_loop_per_worker``: the recipe of train/loop.py."""
    from recfound.train.loop import train

    train(config["args"])

"""A built dataset's task tables as Ray Data datasets, one per task: what the trainer streams from."""

from __future__ import annotations

import pyarrow.parquet as pq
import ray.data
from fsspec.core import url_to_fs

from recfound.tasks import ALL_TASKS, SPLITS, task_path


def task_dataset(data_dir: str, split: str, task: str) -> ray.data.Dataset:
    """One task's rows; a missing or empty table is an error naming the task (it would silently starve a mix)."""
    if task not in ALL_TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(ALL_TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    url = f"{data_dir.rstrip('/')}/{task_path(task, split)}"
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"task {task!r}: no {split} table at {url} (was it skipped? see manifest.json)")
    with fs.open(path, "rb") as handle:
        if pq.ParquetFile(handle).metadata.num_rows == 0:
            raise ValueError(f"task {task!r}: the {split} table at {url} has no rows")
    return ray.data.read_parquet(url)


def task_datasets(data_dir: str, split: str, tasks: list[str]) -> dict[str, ray.data.Dataset]:
    """Per-task datasets in the order given; tokenisation is added per task with ``map_batches``."""
    return {task: task_dataset(data_dir, split, task) for task in tasks}

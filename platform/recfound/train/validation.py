"""S2Sched's ``source: valid``: per-task losses re-measured on a few fixed validation batches (the paper's way).

Rank 0 alone measures, on the unwrapped model with no cross-device negatives, so no collective is involved; the
batches are tokenised once at start-up, so each update costs only the forward passes.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch
from fsspec.core import url_to_fs

from recfound.model.grm import GRM
from recfound.model.losses import LossConfig
from recfound.tasks import Mode, mode_of, task_path
from recfound.train.batches import Rows, collate, tokenize
from recfound.train.objective import JointObjective


class ValidationProbe:
    """Fixed validation batches per task and the per-task losses of the current model on them."""

    def __init__(self, data: str, tasks: list[str], backbone: dict, sizes: dict[Mode, int], batches: int) -> None:
        self.batches: dict[str, list[Rows]] = {}
        for task in tasks:
            size = max(1, sizes[mode_of(task)])
            fs, root = url_to_fs(data)
            table = pq.read_table(f"{root}/{task_path(task, 'valid')}", filesystem=fs).slice(0, size * batches)
            if not table.num_rows:
                raise ValueError(f"scheduler.source=valid but task {task} has no valid rows in {data}")
            rows = {name: np.asarray(table.column(name).to_pylist(), dtype=object) for name in table.column_names}
            tokens = tokenize(rows, backbone, task)
            chunks = [{k: v[i : i + size] for k, v in tokens.items()} for i in range(0, table.num_rows, size)]
            self.batches[task] = [b for b in (collate([c], mode_of(task)) for c in chunks) if b is not None]

    @torch.no_grad()
    def losses(self, grm: GRM, loss: LossConfig) -> dict[str, float]:
        # Plain InfoNCE on this rank's rows: a trend signal for the scheduler, comparable step to step (the last
        # layer's only: exit terms never reach the per-task losses, so computing them would be wasted).
        plain = loss.model_copy(update={"cross_device_negatives": False, "logq_tasks": [], "exit_layers": []})
        objective = JointObjective(grm, plain)
        was_training = grm.training
        grm.eval()
        try:
            out = {}
            for task, batches in self.batches.items():
                totals = [
                    objective(*((b, None) if mode_of(task) is Mode.EMBEDDING else (None, b)))[1][task] for b in batches
                ]
                out[task] = float(sum(t[0] for t in totals) / sum(t[1] for t in totals))
            return out
        finally:
            grm.train(was_training)

"""One training step's forward: the embedding part and the generative part in one module call.

DDP expects one forward per backward, so both objectives run inside ``JointObjective.forward``. Losses are also
returned per task (sum and count), which is what S2Sched consumes; the schedule never weights the loss itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from recfound.model.grm import GRM
from recfound.model.losses import LossConfig, contrastive_loss, total_loss
from recfound.train.batches import Rows

TaskStats = dict[str, tuple[torch.Tensor, torch.Tensor]]  # task -> (summed loss, count), detached


def _per_task(values: torch.Tensor, tasks: Sequence[str]) -> TaskStats:
    out: TaskStats = {}
    for task in dict.fromkeys(tasks):
        rows = torch.as_tensor(np.asarray(tasks) == task, device=values.device)
        out[task] = (values[rows].detach().sum(), rows.sum())
    return out


class JointObjective(nn.Module):
    """w_c * InfoNCE over the step's embedding rows + w_g * token-mean CE over its generative rows."""

    def __init__(self, grm: GRM, cfg: LossConfig) -> None:
        super().__init__()
        self.grm, self.cfg = grm, cfg

    def forward(self, emb: Rows | None, gen: Rows | None) -> tuple[torch.Tensor, TaskStats]:
        contrastive = generative = None
        stats: TaskStats = {}
        if emb is not None:
            contrastive, task_stats = self._contrastive(emb)
            stats |= task_stats
        if gen is not None:
            generative, task_stats = self._generative(gen)
            stats |= task_stats
        return total_loss(self.cfg, contrastive, generative), stats

    def _contrastive(self, rows: Rows) -> tuple[torch.Tensor, TaskStats]:
        tasks = list(rows["task"])
        batch, group, width = rows["p_ids"].shape
        ids = self.grm.task_ids(tasks)
        queries = self.grm.embed(
            {"input_ids": rows["q_ids"], "attention_mask": rows["q_mask"], "text_mask": rows["q_text"]}, ids
        )
        flat = {
            "input_ids": rows["p_ids"].reshape(-1, width),
            "attention_mask": rows["p_mask"].reshape(-1, width),
            "text_mask": rows["p_text"].reshape(-1, width),
        }
        passages = self.grm.embed(flat, ids.repeat_interleave(group)).reshape(batch, group, -1)
        per_query = contrastive_loss(
            queries, passages, self.cfg.temperature, self.cfg.cross_device_negatives, reduction="none"
        )
        return per_query.mean(), _per_task(per_query, tasks)

    def _generative(self, rows: Rows) -> tuple[torch.Tensor, TaskStats]:
        tasks = list(rows["task"])
        token_losses, row_of_token = self.grm.lm_token_losses(
            {"input_ids": rows["ids"], "attention_mask": rows["mask"], "labels": rows["labels"]},
            self.grm.task_ids(tasks),
        )
        token_tasks = np.asarray(tasks)[row_of_token.cpu().numpy()]
        # Token mean over the whole step, as the paper; an empty response set still gives a graph-attached 0.
        loss = token_losses.sum() / max(1, token_losses.numel())
        return loss, _per_task(token_losses, list(token_tasks))

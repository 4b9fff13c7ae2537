"""One training step's forward: the embedding part and the generative part in one module call.

DDP expects one forward per backward, so both objectives run inside ``JointObjective.forward``. Losses are also
returned per task (sum and count), which is what S2Sched consumes; the schedule never weights the loss itself.

GradCache (Gao et al. 2021; GritLM's chunk 16): the contrastive loss needs every embedding of the big batch at
once, but not every activation behind them. With ``grad_cache_chunk``, embeddings are computed in chunks under
non-reentrant activation checkpointing: the forward keeps only each chunk's inputs and its embeddings, the loss
runs over the whole batch, and the backward recomputes one chunk at a time (same dropout masks: the RNG state is
restored) and pushes the cached embedding gradients through it. That is GradCache's memory profile and its
gradients, as one forward and one backward, so DDP and DeepSpeed see an ordinary step.

Early exit (``loss.exit_layers``): each listed decoder layer's embeddings get their own InfoNCE, read from the same
forward as the last layer's (``GRM.embed_exits``), with the same negatives, masks and logQ; the per-task losses
S2Sched reads stay the last layer's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from recfound.model.grm import GRM
from recfound.model.losses import LossConfig, PairKeys, contrastive_loss, total_loss
from recfound.train.batches import Rows
from recfound.train.popularity import ItemPrior

TaskStats = dict[str, tuple[torch.Tensor, torch.Tensor]]  # task -> (summed loss, count), detached
LENGTH_GROUP = 8
"""Texts per embedding forward without GradCache: small enough to cut padding, big enough for efficient matmuls."""
FALSE_NEGATIVES = "false_negatives"
"""Stats key beside the tasks: (queries with a masked false negative, queries) of the step."""


def _per_task(values: torch.Tensor, tasks: Sequence[str]) -> TaskStats:
    out: TaskStats = {}
    for task in dict.fromkeys(tasks):
        rows = torch.as_tensor(np.asarray(tasks) == task, device=values.device)
        out[task] = (values[rows].detach().sum(), rows.sum())
    return out


class JointObjective(nn.Module):
    """w_c * InfoNCE over the step's embedding rows + w_g * token-mean CE over its generative rows."""

    def __init__(self, grm: GRM, cfg: LossConfig, grad_cache_chunk: int = 0, prior: ItemPrior | None = None) -> None:
        super().__init__()
        if cfg.logq_tasks and prior is None:
            raise ValueError("loss.logq_tasks needs the items' popularity prior (ItemPrior.from_dataset)")
        self.layers: list[int] = []
        """Layers embedded per text with exits on, the last one last; empty: the last layer only (``GRM.embed``)."""
        if cfg.exit_layers:
            grm.check_exits(cfg.exit_layers, "loss.exit_layers")
            if max(cfg.exit_layers) >= grm.num_layers:
                raise ValueError(
                    f"loss.exit_layers {cfg.exit_layers}: an exit must be below the backbone's depth "
                    f"({grm.num_layers}); the last layer already trains"
                )
            self.layers = [*cfg.exit_layers, grm.num_layers]
        self.grm, self.cfg, self.grad_cache_chunk = grm, cfg, grad_cache_chunk
        self.prior = prior if cfg.logq_tasks else None

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
        queries = self._embed(rows["q_ids"], rows["q_mask"], rows["q_text"], ids)  # (layers, B, D)
        flat = [rows[key].reshape(-1, width) for key in ("p_ids", "p_mask", "p_text")]
        passages = self._embed(*flat, ids.repeat_interleave(group)).reshape(len(queries), batch, group, -1)
        keys = PairKeys(*(torch.as_tensor(rows[k], device=ids.device) for k in ("q_key", "p_key")))
        log_q = corrected = None
        if self.prior:
            log_q = torch.as_tensor(self.prior.lookup(rows["p_key"]), device=ids.device)
            corrected = torch.as_tensor(np.isin(tasks, self.cfg.logq_tasks), device=ids.device)
        per_query, masked = contrastive_loss(
            queries[-1],
            passages[-1],
            self.cfg.temperature,
            self.cfg.cross_device_negatives,
            reduction="none",
            keys=keys,
            log_q=log_q,
            corrected=corrected,
        )
        stats = _per_task(per_query, tasks)
        stats[FALSE_NEGATIVES] = ((masked > 0).sum().detach(), torch.tensor(batch))
        loss = per_query.mean()
        for exit_queries, exit_passages in zip(queries[:-1], passages[:-1]):
            loss = loss + self.cfg.exit_weight * self._exit_loss(exit_queries, exit_passages, keys, log_q, corrected)
        return loss, stats

    def _exit_loss(
        self,
        queries: torch.Tensor,
        passages: torch.Tensor,
        keys: PairKeys,
        log_q: torch.Tensor | None,
        corrected: torch.Tensor | None,
    ) -> torch.Tensor:
        """One exit layer's InfoNCE: the last layer's term on that layer's embeddings."""
        return contrastive_loss(
            queries,
            passages,
            self.cfg.temperature,
            self.cfg.cross_device_negatives,
            keys=keys,
            log_q=log_q,
            corrected=corrected,
        ).loss

    def _embed(self, ids: np.ndarray, mask: np.ndarray, text: np.ndarray, task_ids: torch.Tensor) -> torch.Tensor:
        """(layers, n, D): ``grm.embed`` (the last layer only) or ``grm.embed_exits`` (``self.layers``) of the
        step's texts in length order, in groups cut to their own longest row: a short Q2I query no longer pays for
        the longest U2I history of the step (exact: padding is masked out). Groups are GradCache chunks under
        activation checkpointing when that is on (see the module doc)."""
        order = np.argsort(-mask.sum(-1), kind="stable")
        size = self.grad_cache_chunk or LENGTH_GROUP
        cache = bool(self.grad_cache_chunk) and torch.is_grad_enabled()
        parts = []
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            width = int(mask[rows].any(0).nonzero()[0].max(initial=0)) + 1
            args = (ids[rows, :width], mask[rows, :width], text[rows, :width], task_ids[torch.as_tensor(rows)])
            parts.append(checkpoint(self._embed_rows, *args, use_reentrant=False) if cache else self._embed_rows(*args))
        return torch.cat(parts, 1)[:, torch.as_tensor(np.argsort(order), device=task_ids.device)]

    def _embed_rows(self, ids: np.ndarray, mask: np.ndarray, text: np.ndarray, task_ids: torch.Tensor) -> torch.Tensor:
        batch = {"input_ids": ids, "attention_mask": mask, "text_mask": text}
        if self.layers:
            return self.grm.embed_exits(batch, task_ids, self.layers)
        return self.grm.embed(batch, task_ids)[None]

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

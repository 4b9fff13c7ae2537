"""RecFound's two objectives: InfoNCE over normalised embeddings and response-only causal-LM cross-entropy."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch.distributed._functional_collectives import all_gather_single

from recfound.config import CommaList, Config
from recfound.tasks import EMBEDDING_TASKS


class LossConfig(Config):
    """Weights and temperature of the joint objective."""

    temperature: float = 0.02
    """InfoNCE temperature on cosine scores (the paper's 0.02 makes scores span about [-50, 50])."""
    contrastive_weight: float = 1.0
    """Weight of the contrastive (embedding) loss in the total."""
    generative_weight: float = 1.0
    """Weight of the generative (response cross-entropy) loss in the total."""
    cross_device_negatives: bool = True
    """Under torch.distributed, score each query against every rank's passages (more negatives per step)."""
    logq_tasks: CommaList[str] = []
    """Embedding tasks whose queries are scored with logQ correction: log q(item), the item's share of the
    training positives, subtracted from each candidate's logit (Yi et al. 2019). In-batch negatives are other
    rows' positives, so plain InfoNCE pushes popular items down; corrected, it estimates the full softmax and keeps
    popularity. That suits U2I (what a user buys next follows popularity) but not Q2I, where the positive is what
    the query's text describes (measured on Magazine: U2I full NDCG@10 0.069 -> 0.087, Q2I pool MRR@20 0.359 ->
    0.218 with every task corrected; with [u2i], three seeds of the quality recipe: U2I pool MRR@20 +0.023, not
    settled, Q2I -0.032, settled). Costs one pass over the positives' ids at start-up."""

    exit_layers: CommaList[int] = []
    """Early exit (M6-Rec): decoder layers (1 = the first) whose embeddings also train, each with its own InfoNCE
    term (same queries, passages, negatives, masks and logQ as the last layer's), read from the same forward pass.
    They make ``embed(exit_layer=k)`` (jobs/evaluate.py, jobs/export.py exit_layer=k) usable: k of L layers cost
    about k/L of the compute, at some retrieval quality (jobs/benchmark.py exit measures both). Each must be below
    the backbone's depth; costs one more InfoNCE score matrix per exit, no extra forward."""
    exit_weight: float = Field(1.0, ge=0)
    """Weight of each exit layer's InfoNCE, added to the last layer's: contrastive = last + exit_weight x sum over
    exit_layers. Lower keeps the full-depth embedding closer to what it would be without exits."""

    @field_validator("exit_layers")
    @classmethod
    def _positive_layers(cls, layers: list[int]) -> list[int]:
        if any(k < 1 for k in layers):
            raise ValueError(f"exit_layers {layers}: a layer is counted from 1 (the output of the first layer)")
        return sorted(set(layers))

    @field_validator("logq_tasks")
    @classmethod
    def _embedding_tasks(cls, tasks: list[str]) -> list[str]:
        wrong = [t for t in tasks if t not in EMBEDDING_TASKS]
        if wrong:
            raise ValueError(f"logq_tasks takes embedding tasks ({', '.join(EMBEDDING_TASKS)}), not {', '.join(wrong)}")
        return tasks


class PairKeys(NamedTuple):
    """Who is who in a contrastive batch, as int64 hashes (train/batches.py ``pair_keys``): the false-negative mask
    compares them."""

    query: torch.Tensor
    """(B,) each query's text."""
    items: torch.Tensor
    """(B, 1 + K) the item of each passage (its text where the row names no item), positive first."""


class InfoNCE(NamedTuple):
    loss: torch.Tensor
    """Mean over the local queries, or one per query with ``reduction="none"``."""
    false_negatives: torch.Tensor
    """(B,) candidates masked out of each local query's denominator (0 without keys)."""


def _gather(values: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, values.contiguous())
    return torch.cat(parts)


def contrastive_loss(
    queries: torch.Tensor,
    passages: torch.Tensor,
    temperature: float = 0.02,
    cross_device: bool = True,
    reduction: Literal["mean", "none"] = "mean",
    keys: PairKeys | None = None,
    log_q: torch.Tensor | None = None,
    corrected: torch.Tensor | None = None,
) -> InfoNCE:
    """InfoNCE of L2-normalised embeddings (``reduction="none"``: one loss per query, which is how training
    reports a loss per task).

    queries (B, D); passages (B, 1 + K, D) with each query's positive first and its K hard negatives after.
    Every passage in the batch that is not the query's own positive is a negative (in-batch negatives); when
    torch.distributed is initialised with ``cross_device``, so is every passage on every other rank. The gather
    keeps gradients (``all_gather_single``, whose backward sums each rank's gradient back to the owner) and needs
    the same B and K on all ranks.

    With ``keys``, a candidate that is really a positive of the query is left out of its denominator (as
    GritLM and sentence-transformers do): the query's positive item showing up elsewhere in the batch, or the
    positive of another row with the same query text (one I2I anchor's several related items, one user twice).
    Pushing those apart would teach the model to push away exactly what it should retrieve.

    ``log_q`` (B, 1 + K): log of each passage's sampling probability, subtracted from its logit (logQ correction)
    in the rows of the queries ``corrected`` (B,) marks, or in every row without it.
    """
    batch, group, dim = passages.shape
    if queries.shape != (batch, dim):
        raise ValueError(f"queries {tuple(queries.shape)} do not match passages {tuple(passages.shape)}")
    candidates = passages.reshape(batch * group, dim)
    distributed = cross_device and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    offset = 0
    if distributed:
        candidates = all_gather_single(candidates.contiguous(), 0, dist.group.WORLD)
        offset = dist.get_rank() * batch * group
    scores = queries.float() @ candidates.float().T / temperature
    if log_q is not None:
        log_q = log_q.reshape(batch * group).to(scores)
        log_q = (_gather(log_q) if distributed else log_q)[None, :]
        scores = scores - (log_q if corrected is None else corrected.to(scores)[:, None] * log_q)
    targets = offset + torch.arange(batch, device=scores.device) * group
    masked = torch.zeros(batch, dtype=torch.long, device=scores.device)
    if keys is not None:
        items, owners = keys.items.reshape(-1), keys.query.repeat_interleave(group)
        if distributed:
            items, owners = _gather(items), _gather(owners)
        is_positive = torch.arange(len(items), device=items.device) % group == 0
        false = (items[None, :] == keys.items[:, :1]) | ((owners[None, :] == keys.query[:, None]) & is_positive)
        false[torch.arange(batch), targets] = False
        scores = scores.masked_fill(false.to(scores.device), float("-inf"))
        masked = false.sum(1).to(scores.device)
    return InfoNCE(F.cross_entropy(scores, targets, reduction=reduction), masked)


def total_loss(cfg: LossConfig, contrastive: torch.Tensor | None, generative: torch.Tensor | None) -> torch.Tensor:
    """w_c * contrastive + w_g * generative; a step without one mode passes None for it."""
    terms = [
        w * loss
        for w, loss in ((cfg.contrastive_weight, contrastive), (cfg.generative_weight, generative))
        if loss is not None
    ]
    if not terms:
        raise ValueError("total_loss needs at least one of contrastive / generative")
    return torch.stack(terms).sum()

"""RecFound's two objectives: InfoNCE over normalised embeddings and response-only causal-LM cross-entropy."""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from recfound.config import Config


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


def contrastive_loss(
    queries: torch.Tensor,
    passages: torch.Tensor,
    temperature: float = 0.02,
    cross_device: bool = True,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """InfoNCE of L2-normalised embeddings, mean over the local queries (``reduction="none"``: one per query,
    which is how training reports a loss per task).

    queries (B, D); passages (B, 1 + K, D) with each query's positive first and its K hard negatives after.
    Every passage in the batch that is not the query's own positive is a negative (in-batch negatives); when
    torch.distributed is initialised with ``cross_device``, so is every passage on every other rank. The gather
    keeps gradients (``torch.distributed.nn.functional.all_gather``) and needs the same B and K on all ranks.
    """
    batch, group, dim = passages.shape
    if queries.shape != (batch, dim):
        raise ValueError(f"queries {tuple(queries.shape)} do not match passages {tuple(passages.shape)}")
    candidates = passages.reshape(batch * group, dim)
    offset = 0
    if cross_device and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_gather

        candidates = torch.cat(all_gather(candidates), dim=0)
        offset = dist.get_rank() * batch * group
    scores = queries.float() @ candidates.float().T / temperature
    targets = offset + torch.arange(batch, device=scores.device) * group
    return F.cross_entropy(scores, targets, reduction=reduction)


def total_loss(cfg: LossConfig, contrastive: torch.Tensor | None, generative: torch.Tensor | None) -> torch.Tensor:
    """w_c * contrastive + w_g * generative; a step without one mode passes None for it."""
    terms = [w * loss for w, loss in ((cfg.contrastive_weight, contrastive), (cfg.generative_weight, generative))
             if loss is not None]  # fmt: skip
    if not terms:
        raise ValueError("total_loss needs at least one of contrastive / generative")
    return torch.stack(terms).sum()

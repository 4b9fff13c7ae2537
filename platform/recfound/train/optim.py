"""AdamW over the trainable (TMoLE) parameters with linear warmup and linear decay, as in the paper run."""

from __future__ import annotations

import torch
from pydantic import Field

from recfound.config import Config


class OptimConfig(Config):
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate. The paper uses 2e-5 on a 7B backbone; a tiny random model needs ~1e-3 to move."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay on adapter weights; LoRA usually trains without it."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Share of max_steps spent ramping the LR up from 0 (paper: 3 %). Longer is steadier, slower to start."""
    grad_clip: float = Field(1.0, gt=0)
    """Max global grad norm (paper: 1.0); guards the contrastive loss's sharp temperature against spikes."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step: a larger effective batch at the same memory, more time per step."""
    max_skipped_steps: int = Field(3, ge=0)
    """Consecutive steps whose gradient norm is inf/NaN (with finite losses) that are skipped, weights untouched,
    before the run stops; an occasional overflow passes, a model that keeps producing them stops. Under ZeRO
    the update is applied inside backward, so there the first such step stops the run."""


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_lr_schedule(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, round(cfg.warmup_ratio * max_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

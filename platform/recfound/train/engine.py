"""How a worker applies gradients: torch's AdamW (under DDP), or DeepSpeed ZeRO, behind one small interface.

The loop calls the engine for forward, backward, step, checkpoint and restore, and never asks which one it is.
Both use the same AdamW, warmup + linear decay and grad-norm clip, so ``zero_stage`` changes memory and
communication, not the optimisation: a ZeRO run's loss curve follows the DDP run's.

Checkpoint files (next to what ``checkpoint.save`` writes):
  torch:     optimizer.pt           AdamW + LR-schedule state (rank 0; every rank holds the same)
  DeepSpeed: zero/ckpt/...          each rank's ZeRO partition of the optimizer (and, for stage 3, parameters),
             zero/rank-<r>.json     SHA-256 of rank r's files: a checkpoint missing any rank's part is refused
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from recfound.artifacts import hash_tree, read_trainer_state, verify_tree
from recfound.train.checkpoint import CorruptCheckpointError
from recfound.train.config import TrainConfig
from recfound.train.optim import build_lr_schedule, build_optimizer

ZERO_DIR, ZERO_TAG = "zero", "ckpt"


class TrainEngine(Protocol):
    """What the training loop needs from the thing that owns the optimizer."""

    def __call__(self, *batch: Any) -> tuple[torch.Tensor, Any]: ...
    def zero_grad(self) -> None: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> bool: ...
    def lr(self) -> float: ...
    def full_weights(self) -> contextlib.AbstractContextManager[None]: ...
    def save(self, root: Path, rank: int) -> bool: ...
    def load(self, root: Path, rank: int) -> None: ...


def clipped_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, clip: float) -> bool:
    """Clip, then step only when the global gradient norm is finite: one inf/NaN gradient (an overflow, a bad row)
    would turn every weight it reaches into NaN, and the next checkpoint would save them. DDP all-reduced the
    gradients, so every rank decides alike."""
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


class TorchEngine:
    """torch's AdamW on ``model``: the objective wrapped in DDP (gloo on CPU, NCCL on GPU) by Ray Train's
    ``prepare_model`` in a worker, or the bare objective in one process (the benchmark's plain loop). AdamW state
    is replicated on every rank."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], cfg: TrainConfig) -> None:
        self.model, self.params, self.cfg = model, params, cfg
        self.optimizer = build_optimizer(params, cfg.optim)
        self.lr_schedule = build_lr_schedule(self.optimizer, cfg.optim, cfg.max_steps)

    def __call__(self, *batch: Any) -> tuple[torch.Tensor, Any]:
        return self.model(*batch)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.optim.grad_accum).backward()

    def step(self) -> bool:
        """Whether the update was applied: skipped when the gradient norm is not finite (see ``clipped_step``)."""
        applied = clipped_step(self.params, self.optimizer, self.cfg.optim.grad_clip)
        self.lr_schedule.step()  # the LR stays a function of the step, as a resume recomputes it
        return applied

    def lr(self) -> float:
        return self.lr_schedule.get_last_lr()[0]

    def full_weights(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def save(self, root: Path, rank: int) -> bool:
        """Rank 0 writes optimizer.pt; returns whether this rank wrote checkpoint files."""
        if rank != 0:
            return False
        state = {"optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict()}
        torch.save(state, root / "optimizer.pt")
        return True

    def load(self, root: Path, rank: int) -> None:
        blob = torch.load(root / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.lr_schedule.load_state_dict(blob["lr_schedule"])
        rebase_lr(self.lr_schedule)


class DeepSpeedEngine:
    """DeepSpeed ZeRO stage 1-3 (``deepspeed.initialize`` on the process group Ray Train set up).

    Stage 1/2 partition optimizer state (and gradients); stage 3 also the parameters, frozen backbone included,
    so whole-model work (saving the adapter) gathers them first. DeepSpeed owns gradient accumulation: every
    micro-batch calls backward then step, and only the last one of an optimizer step applies it.
    """

    def __init__(self, objective: nn.Module, params: list[nn.Parameter], cfg: TrainConfig, dtype: torch.dtype) -> None:
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.deepspeed, self.params = deepspeed, params
        optimizer = build_optimizer(params, cfg.optim)
        config = {
            "train_micro_batch_size_per_gpu": 1,  # our batches are per-task mixes; DeepSpeed only needs the count
            "gradient_accumulation_steps": cfg.optim.grad_accum,
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "bf16": {"enabled": dtype == torch.bfloat16},
            "steps_per_print": 2**31 - 1,
        }
        self.engine, _, _, self.lr_schedule = deepspeed.initialize(
            model=objective,
            optimizer=optimizer,
            model_parameters=params,
            config=config,
            lr_scheduler=build_lr_schedule(optimizer, cfg.optim, cfg.max_steps),
        )

    def __call__(self, *batch: Any) -> tuple[torch.Tensor, Any]:
        return self.engine(*batch)

    def zero_grad(self) -> None:
        """DeepSpeed clears gradients itself at each optimizer-step boundary."""

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1 / gradient_accumulation_steps
        self.engine.step()  # a no-op except at the accumulation boundary

    def step(self) -> bool:
        """Applied by the last micro-batch's ``backward``; False when that update's gradient norm was not finite
        (the weights may then hold NaN: the loop stops without saving them)."""
        norm = self.engine.get_global_grad_norm()
        return norm is None or math.isfinite(float(norm))

    def lr(self) -> float:
        return self.lr_schedule.get_last_lr()[0]

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        """Stage 3: gather every partitioned parameter (a collective: every rank enters) for a whole-model read."""
        if self.engine.zero_optimization_stage() < 3:
            yield
            return
        with self.deepspeed.zero.GatheredParameters(self.params, modifier_rank=None):
            yield

    def save(self, root: Path, rank: int) -> bool:
        """Every rank writes its partition under zero/ and a manifest of it; the adapter goes via ``full_weights``."""
        self.engine.save_checkpoint(
            str(root / ZERO_DIR), tag=ZERO_TAG, exclude_frozen_parameters=True, save_latest=False
        )
        # Every rank writes into its own temporary directory: all files there beside the manifests are its own.
        digests = {
            f"{ZERO_DIR}/{rel}": digest
            for rel, digest in hash_tree(root / ZERO_DIR).items()
            if not rel.startswith("rank-")
        }
        (root / ZERO_DIR / f"rank-{rank}.json").write_text(json.dumps(digests, indent=2, sort_keys=True))
        return True

    def load(self, root: Path, rank: int) -> None:
        verify_rank(root, rank)
        # The adapter is already restored from adapter/ (frozen weights were never saved: not strict).
        self.engine.load_checkpoint(
            str(root / ZERO_DIR),
            tag=ZERO_TAG,
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        rebase_lr(self.lr_schedule)


def rebase_lr(lr_schedule: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Recompute the restored position's LR with this run's schedule: the saved optimizer carries the LR of the
    run that wrote it, whose decay to 0 at its own max_steps is wrong once a resume raises max_steps."""
    lr_schedule.last_epoch -= 1
    lr_schedule.step()


def verify_rank(root: Path, rank: int) -> None:
    """Raise unless rank ``rank``'s ZeRO partition is present and matches its manifest."""
    manifest = root / ZERO_DIR / f"rank-{rank}.json"
    if not manifest.is_file():
        raise CorruptCheckpointError(f"{root}: no ZeRO partition of rank {rank} ({manifest.name} is missing)")
    files = json.loads(manifest.read_text())
    verify_tree(root, files, listed_in=manifest.name, error=CorruptCheckpointError)


def verify_partitions(root: Path) -> None:
    """Raise unless the partition of every rank of the run that wrote ``root`` verifies. Each rank chooses the
    checkpoint to resume on its own, so all must check all partitions, not just their own, to choose alike."""
    world = read_trainer_state(root)["world_size"]
    for rank in range(world):
        verify_rank(root, rank)


def build_engine(
    objective: nn.Module, cfg: TrainConfig, device: torch.device, dtype: torch.dtype, both_modes: bool
) -> TrainEngine:
    """DeepSpeed when ``cfg.zero_stage`` is set, else DDP; ``both_modes``: the run trains both task modes."""
    params = [p for p in objective.parameters() if p.requires_grad]
    if cfg.zero_stage:
        return DeepSpeedEngine(objective.to(device), params, cfg, dtype)
    import ray.train.torch

    # A run of one mode never uses the other mode's experts: DDP must not wait for their gradients.
    model = ray.train.torch.prepare_model(
        objective, parallel_strategy_kwargs={"find_unused_parameters": not both_modes}
    )
    return TorchEngine(model, params, cfg)

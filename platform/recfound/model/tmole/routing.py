"""How the task of each sample reaches every TMoLE layer during one forward.

The transformers model code does not pass extra arguments down to ``nn.Linear``, so the wrapper publishes a
``Routing`` in a ``contextvars.ContextVar`` for the duration of the call (``TMoLEModel.route``). A ContextVar is
private to its thread and asyncio task, so concurrent forwards (threads of a serving replica, async handlers) never
see each other's routing, and nothing survives the ``with`` block. Activation checkpointing replays layers during
backward, after the block has exited; ``checkpoint_context`` (a ``context_fn`` for ``torch.utils.checkpoint``)
captures the routing at forward time and re-enters it for the replay.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import ContextManager

import torch


@dataclass(frozen=True)
class Routing:
    """Router inputs of one forward.

    task_emb: (B, task_dim) task-table rows, or (1, task_dim) when the whole batch is one task (broadcasts, so
    beam search may grow the batch). task_ids: (B,) or (1,) the rows' task indexes (private experts pick their
    samples by them). logit_mask: (E,) 0 / -inf removing the other mode's expert group.
    fold_task / fold_key: set only for single-task inference; layers may then use a cached folded weight, valid
    while fold_key (a fingerprint of all weights) is unchanged.
    """

    task_emb: torch.Tensor
    task_ids: torch.Tensor
    logit_mask: torch.Tensor
    fold_task: int | None = None
    fold_key: Hashable = None


_ROUTING: ContextVar[Routing | None] = ContextVar("tmole_routing", default=None)


@contextmanager
def use_routing(routing: Routing) -> Iterator[None]:
    token = _ROUTING.set(routing)
    try:
        yield
    finally:
        _ROUTING.reset(token)


def current_routing() -> Routing:
    routing = _ROUTING.get()
    if routing is None:
        raise RuntimeError(
            "a TMoLE layer ran without a task: call the model through TMoLEModel (forward/generate with "
            "task_ids=...) or inside `with tmole_model.route(task_ids, mode):`"
        )
    return routing


def checkpoint_context() -> tuple[ContextManager[None], ContextManager[None]]:
    """``context_fn`` for non-reentrant checkpointing: the backward replay runs under the forward's routing."""
    routing = _ROUTING.get()
    return nullcontext(), (use_routing(routing) if routing is not None else nullcontext())

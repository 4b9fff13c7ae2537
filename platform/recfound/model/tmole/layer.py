"""The TMoLE linear: a frozen base ``nn.Linear`` plus E routed LoRA experts.

h = W0 x + sum_i g_i(task) * (alpha / r) * B_i A_i dropout(x), with g = softmax(router(task_emb) + mode mask).
All experts run as two matmuls: A stacked to (E*r, in), B concatenated to (out, E*r), the per-sample gates
scaling the E*r intermediate features in between; no Python loop over experts.

A task may also own a private expert (``TMoLEConfig.task_experts``, written by jobs/adapt.py method=expert): one more
LoRA of its own rank, added (alpha / r) B_t A_t x, ungated, to that task's samples only; the shared experts never see
it, so adding one changes no other task.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from recfound.model.tmole.config import TMoLEConfig
from recfound.model.tmole.routing import Routing, current_routing


class TMoLELayer(BaseTunerLayer):
    """peft tuner-layer mixin: per-adapter experts and router, keyed by adapter name like every peft layer."""

    adapter_layer_names = ("tmole_A", "tmole_B", "tmole_router", "tmole_task_A", "tmole_task_B")
    other_param_names = ("r", "scaling")
    # Folded weights kept per layer (oldest evicted first); each costs one copy of the base weight.
    max_folded_tasks = 4

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.tmole_A = nn.ParameterDict()
        self.tmole_B = nn.ParameterDict()
        self.tmole_router = nn.ModuleDict()
        self.tmole_dropout = nn.ModuleDict()
        # adapter -> task name -> (r_t, in) / (out, r_t); task_index maps each name to its task-table row.
        self.tmole_task_A = nn.ModuleDict()
        self.tmole_task_B = nn.ModuleDict()
        self.task_index: dict[str, dict[str, int]] = {}
        self._folded: dict[int, tuple[Hashable, torch.Tensor]] = {}
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"TMoLE adapts nn.Linear only, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, config: TMoLEConfig) -> None:
        experts, r = config.num_experts, config.r
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.scaling
        self.tmole_A[adapter_name] = nn.Parameter(torch.empty(experts, r, self.in_features))
        self.tmole_B[adapter_name] = nn.Parameter(torch.zeros(experts, self.out_features, r))
        self.tmole_router[adapter_name] = nn.Linear(config.task_dim, experts)
        self.tmole_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        experts_of = config.task_experts.items()
        self.tmole_task_A[adapter_name] = nn.ParameterDict(
            {t: nn.Parameter(torch.empty(rank, self.in_features)) for t, rank in experts_of}
        )
        self.tmole_task_B[adapter_name] = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(self.out_features, rank)) for t, rank in experts_of}
        )
        self.task_index[adapter_name] = {t: config.tasks.index(t) for t in config.task_experts}
        self._reset(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def _reset(self, adapter_name: str) -> None:
        # Each expert is an independent LoRA: A like nn.Linear's default init, B zero so training starts at W0.
        for a in self.tmole_A[adapter_name]:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        for a in self.tmole_task_A[adapter_name].values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        router = self.tmole_router[adapter_name]
        nn.init.normal_(router.weight)
        nn.init.zeros_(router.bias)

    def gates(self, adapter_name: str, routing: Routing) -> torch.Tensor:
        """(B or 1, E) float32 mixture weights; exactly zero on the masked group."""
        router = self.tmole_router[adapter_name]
        logits = router(routing.task_emb.to(router.weight.dtype)).float()
        return torch.softmax(logits + routing.logit_mask.to(logits.device), dim=-1)

    def delta_weight(self, adapter_name: str, routing: Routing) -> torch.Tensor:
        """(out, in) sum_i g_i (alpha/r) B_i A_i for the first routing row (a single-task batch), plus that task's
        private expert when it has one."""
        gates = self.gates(adapter_name, routing)[0] * self.scaling[adapter_name]
        a, b = self.tmole_A[adapter_name], self.tmole_B[adapter_name]
        delta = torch.einsum("e,eor,eri->oi", gates.to(a.dtype), b, a)
        task = int(routing.task_ids.reshape(-1)[0])
        for name, index in self.task_index[adapter_name].items():
            if index == task:
                private = self.tmole_task_B[adapter_name][name] @ self.tmole_task_A[adapter_name][name]
                delta = delta + self.scaling[adapter_name] * private
        return delta

    def clear_folded(self) -> None:
        self._folded.clear()

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError("TMoLE's delta depends on the task: use TMoLEModel.merge_task(task)")


class Linear(nn.Module, TMoLELayer):
    """Drop-in replacement for a targeted ``nn.Linear`` (``base_layer`` keeps the frozen original)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: TMoLEConfig) -> None:
        super().__init__()
        TMoLELayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        routing = current_routing()
        adapter = self._single_active_adapter()
        if routing.fold_task is not None:
            base = self.get_base_layer()
            return F.linear(x, self._folded_weight(adapter, routing), base.bias)
        delta = self._experts(x, adapter, routing)
        if self.task_index[adapter]:
            delta = delta + self._task_experts(x, adapter, routing)
        return self.base_layer(x, *args, **kwargs) + delta.to(x.dtype)

    def _single_active_adapter(self) -> str:
        (adapter,) = self.active_adapters  # routing state is per adapter; mixing adapters is not defined
        return adapter

    def _experts(self, x: torch.Tensor, adapter: str, routing: Routing) -> torch.Tensor:
        """Computed in the input's dtype, as autocast would: float32 weights (the optimizer's) cast to a bf16
        backbone's dtype per call. Upcasting the input instead ran these matmuls, about a quarter of the frozen
        ones' FLOPs, at a CPU's float32 rate, a quarter of its bf16 one (a SmolLM2-135M embedding forward and
        backward: 1.2-1.35x faster this way)."""
        a, b = self.tmole_A[adapter], self.tmole_B[adapter]
        experts, r, _ = a.shape
        hidden = F.linear(self.tmole_dropout[adapter](x), a.reshape(experts * r, -1).to(x.dtype))
        scale = (self.gates(adapter, routing) * self.scaling[adapter]).repeat_interleave(r, dim=-1)
        scale = scale.reshape(scale.shape[0], *([1] * (hidden.dim() - 2)), experts * r)
        up = b.permute(1, 0, 2).reshape(self.out_features, experts * r).to(x.dtype)
        return F.linear(hidden * scale.to(hidden.dtype), up)

    def _task_experts(self, x: torch.Tensor, adapter: str, routing: Routing) -> torch.Tensor:
        """Each private expert's (alpha/r) B_t A_t x on its own task's samples, zero on the others; experts of tasks
        absent from the batch cost nothing."""
        ids = routing.task_ids.reshape(-1).to(x.device)
        out = torch.zeros((), device=x.device, dtype=self.tmole_A[adapter].dtype)
        dropped = self.tmole_dropout[adapter](x.to(out.dtype))
        for name, index in self.task_index[adapter].items():
            mine = ids == index
            if not bool(mine.any()):
                continue
            a, b = self.tmole_task_A[adapter][name], self.tmole_task_B[adapter][name]
            mask = mine.reshape(-1, *([1] * (x.dim() - 1))).to(out.dtype) * self.scaling[adapter]
            out = out + F.linear(F.linear(dropped, a), b) * mask
        return out

    @torch.no_grad()
    def _folded_weight(self, adapter: str, routing: Routing) -> torch.Tensor:
        """W0 + dW(task), cached per task (first in, first out) while the weights' fingerprint is unchanged."""
        task = routing.fold_task
        assert task is not None
        cached = self._folded.get(task)
        if cached is not None and cached[0] == routing.fold_key:
            return cached[1]
        base = self.get_base_layer().weight
        weight = (base.float() + self.delta_weight(adapter, routing).float()).to(base.dtype)
        self._folded.pop(task, None)
        self._folded[task] = (routing.fold_key, weight)
        while len(self._folded) > self.max_folded_tasks:
            self._folded.pop(next(iter(self._folded)), None)
        return weight

    @torch.no_grad()
    def fold_into_base(self, adapter: str, routing: Routing) -> None:
        """Add the routed delta into W0 in place (used on a deep copy by ``TMoLEModel.merge_task``)."""
        base = self.get_base_layer().weight
        base.copy_((base.float() + self.delta_weight(adapter, routing).float()).to(base.dtype))

    def __repr__(self) -> str:
        return "tmole." + super().__repr__()

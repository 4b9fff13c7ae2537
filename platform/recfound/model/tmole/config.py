"""TMoLE adapter configuration, in peft's shape (a ``PeftConfig`` dataclass saved as ``adapter_config.json``)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from peft import PeftConfig

from recfound.model.tmole.hyperparameters import ExpertGroups, TMoLEHyperparameters
from recfound.tasks import ALL_TASKS, Mode, mode_of

PEFT_TYPE = "TMOLE"


@dataclass
class TMoLEConfig(PeftConfig, TMoLEHyperparameters):
    """Task-wise mixture of low-rank experts: per adapted linear, ``num_experts`` LoRA experts mixed by a dense
    softmax gate computed from a learned task embedding (one gate vector per sample, shared by its tokens). The
    hyper-parameters (and their checks) are ``TMoLEHyperparameters``'; the fields here say what it adapts.
    """

    tasks: list[str] = field(
        default_factory=lambda: list(ALL_TASKS), metadata={"help": "Task names; row i of the task table is task i."}
    )
    backbone: dict[str, Any] | None = field(
        default=None, metadata={"help": "The BackboneConfig the adapter was trained on (to reload it alone)."}
    )
    soft_prompts: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": "Tasks with trainable soft-prompt vectors (task -> how many), put before their inputs' "
            "token embeddings (M6-Rec's prompt tuning; written by jobs/adapt.py method=prompt)."
        },
    )
    task_experts: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": "Tasks with a private LoRA expert of their own (task -> rank) in every adapted linear, added "
            "ungated to that task's samples only (written by jobs/adapt.py method=expert)."
        },
    )

    def __post_init__(self) -> None:
        PeftConfig.__post_init__(self)
        TMoLEHyperparameters.__post_init__(self)
        self.peft_type = PEFT_TYPE
        if len(set(self.tasks)) != len(self.tasks) or not self.tasks:
            raise ValueError(f"tasks must be a non-empty list of distinct names, got {self.tasks}")
        for task in self.tasks:
            mode_of(task)  # raises on an unknown task
        wrong = {t: n for t, n in self.soft_prompts.items() if t not in self.tasks or n < 1}
        if wrong:
            raise ValueError(f"soft_prompts {wrong}: each must name a task of {self.tasks} with at least 1 vector")
        wrong = {t: r for t, r in self.task_experts.items() if t not in self.tasks or r < 1}
        if wrong:
            raise ValueError(f"task_experts {wrong}: each must name a task of {self.tasks} with a rank of at least 1")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def expert_modes(self) -> list[frozenset[Mode]]:
        """The modes each expert serves, experts ordered embedding-only, [shared,] generation-only."""
        both = frozenset(Mode)
        if self.groups is ExpertGroups.SHARED:
            return [both] * self.num_experts
        if self.groups is ExpertGroups.THREE:
            size = self.num_experts // 3
            return [frozenset({Mode.EMBEDDING})] * size + [both] * size + [frozenset({Mode.GENERATIVE})] * size
        size = self.num_experts // 2
        return [frozenset({Mode.EMBEDDING})] * size + [frozenset({Mode.GENERATIVE})] * size

    def logit_mask(self, mode: Mode) -> torch.Tensor:
        """(E,) router-logit offsets: -inf on experts that ``mode`` may not use, 0 elsewhere."""
        allowed = torch.tensor([mode in modes for modes in self.expert_modes()])
        return torch.zeros(self.num_experts).masked_fill(~allowed, float("-inf"))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict: the enum as its value; peft bookkeeping fields kept so peft can read the file."""
        out = self.to_dict()
        out["groups"] = self.groups.value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> TMoLEConfig:
        """Inverse of ``to_json``; ``source`` names the file in errors."""
        if not isinstance(data, dict) or data.get("peft_type") != PEFT_TYPE:
            found = data.get("peft_type") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{source}: not a TMoLE adapter config (peft_type={found!r})")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{source}: unknown TMoLE config keys {unknown}")
        return cls(**data)

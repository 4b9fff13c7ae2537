"""TMoLE adapter configuration, in peft's shape (a ``PeftConfig`` dataclass saved as ``adapter_config.json``)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

import torch
from peft import PeftConfig

from recfound.tasks import ALL_TASKS, Mode, mode_of

PEFT_TYPE = "TMOLE"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
HYPERPARAMETERS = (
    "num_experts",
    "r",
    "alpha",
    "dropout",
    "groups",
    "task_dim",
    "target_modules",
    "layers_to_transform",
)
"""The fields a training config sets (``model.adapter``); the others are filled in by whoever builds the adapter
(``tasks``, ``backbone``) or adapts it (``soft_prompts``, ``task_experts``, jobs/adapt.py)."""


class ExpertGroups(str, Enum):
    """How the experts of a layer are split between the two modes.

    THREE (the paper): embedding-only, shared, generation-only, a third each. TWO (what the released code runs,
    because its ``is_shared`` flag never reaches the layers): half embedding-only, half generation-only. SHARED:
    every expert serves both modes; with one expert it is a single LoRA, the "without TMoLE" ablation.
    """

    THREE = "three"
    TWO = "two"
    SHARED = "shared"

    def check(self, num_experts: int) -> None:
        """Raise unless ``num_experts`` splits evenly into this grouping's parts."""
        parts = {ExpertGroups.THREE: 3, ExpertGroups.TWO: 2, ExpertGroups.SHARED: 1}[self]
        if num_experts < parts or num_experts % parts:
            raise ValueError(f"groups={self.value} needs num_experts divisible by {parts}, got {num_experts}")


@dataclass
class TMoLEConfig(PeftConfig):
    """Task-wise mixture of low-rank experts: per adapted linear, ``num_experts`` LoRA experts mixed by a dense
    softmax gate computed from a learned task embedding (one gate vector per sample, shared by its tokens).
    """

    num_experts: int = field(
        default=6,
        metadata={
            "help": "LoRA experts per adapted linear (all groups). More experts separate tasks better; cost grows "
            "linearly. With groups=shared, 1 is a single plain LoRA (the 'without TMoLE' ablation)."
        },
    )
    r: int = field(default=16, metadata={"help": "Rank of each expert: capacity per expert vs adapter size."})
    alpha: float = field(default=64.0, metadata={"help": "LoRA alpha; expert outputs are scaled by alpha / r."})
    dropout: float = field(
        default=0.1,
        metadata={
            "help": "Dropout on the expert input (not the base path); regularises small datasets, slows "
            "convergence slightly."
        },
    )
    groups: ExpertGroups = field(
        default=ExpertGroups.THREE,
        metadata={
            "help": "three: embedding-only, shared and generation-only experts (the paper); two: no shared group "
            "(the released code); shared: every expert serves both modes."
        },
    )
    task_dim: int = field(default=512, metadata={"help": "Width of the learned task embedding that feeds each router."})
    tasks: list[str] = field(
        default_factory=lambda: list(ALL_TASKS), metadata={"help": "Task names; row i of the task table is task i."}
    )
    target_modules: list[str] | str = field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        metadata={
            "help": "Linear layers to adapt: name suffixes, or one regex. Adding MLP projections adds capacity and "
            "cost."
        },
    )
    layers_to_transform: list[int] | None = field(
        default=None,
        metadata={
            "help": "Decoder layers (0-based indexes) whose target linears get experts (peft's LoraConfig field); "
            "None: every layer. Backward stops at the lowest adapted layer, so adapting only the top half of "
            "SmolLM2-135M's 30 layers cut an embedding step's forward + backward from 19.5 s to 12.5 s on 2 cores "
            "(less adapter capacity, fewer layers that move)."
        },
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
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        self.groups = ExpertGroups(self.groups)
        self.groups.check(self.num_experts)
        if self.r <= 0 or self.task_dim <= 0:
            raise ValueError(f"r and task_dim must be positive, got r={self.r}, task_dim={self.task_dim}")
        if self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(
                f"alpha must be positive and dropout in [0, 1), got alpha={self.alpha}, dropout={self.dropout}"
            )
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
        if not isinstance(self.target_modules, str):
            self.target_modules = sorted(self.target_modules)
        if self.layers_to_transform is not None:
            if not self.layers_to_transform or min(self.layers_to_transform) < 0:
                raise ValueError(
                    f"layers_to_transform must be non-empty layer indexes >= 0, got {self.layers_to_transform}"
                )
            self.layers_to_transform = sorted(set(self.layers_to_transform))

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

"""TMoLE's hyper-parameters: the adapter fields a training config sets (``model.adapter``), their defaults, docs and
checks. Kept apart from the peft config (tmole/config.py) so a training config is checked without importing peft,
which costs seconds (it imports transformers' model code); ``TMoLEConfig`` inherits every field from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


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
class TMoLEHyperparameters:
    """Per adapted linear, ``num_experts`` LoRA experts of rank ``r``, mixed by a gate computed from a learned
    ``task_dim``-wide task embedding (paper: 6 experts, r 16, alpha 64, dropout 0.1, 512-d task embedding)."""

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

    def __post_init__(self) -> None:
        self.groups = ExpertGroups(self.groups)
        self.groups.check(self.num_experts)
        if self.r <= 0 or self.task_dim <= 0:
            raise ValueError(f"r and task_dim must be positive, got r={self.r}, task_dim={self.task_dim}")
        if self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(
                f"alpha must be positive and dropout in [0, 1), got alpha={self.alpha}, dropout={self.dropout}"
            )
        if not isinstance(self.target_modules, str):
            self.target_modules = sorted(self.target_modules)
        if self.layers_to_transform is not None:
            if not self.layers_to_transform or min(self.layers_to_transform) < 0:
                raise ValueError(
                    f"layers_to_transform must be non-empty layer indexes >= 0, got {self.layers_to_transform}"
                )
            self.layers_to_transform = sorted(set(self.layers_to_transform))


HYPERPARAMETERS = tuple(f.name for f in fields(TMoLEHyperparameters))
"""The fields a training config sets (``model.adapter``); TMoLEConfig's others are filled in by whoever builds the
adapter (``tasks``, ``backbone``) or adapts it (``soft_prompts``, ``task_experts``, jobs/adapt.py)."""

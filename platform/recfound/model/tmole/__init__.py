"""TMoLE: task-wise mixture of low-rank experts, as a peft tuner (hyper-parameters, config, layer, model).

The names below are imported on first use (PEP 562), not with the package: a training config reads
``tmole.hyperparameters`` without importing peft, which costs seconds (it imports transformers' model code).
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "ExpertGroups": "hyperparameters",
    "Linear": "layer",
    "Routing": "routing",
    "TMoLEConfig": "config",
    "TMoLELayer": "layer",
    "TMoLEModel": "model",
    "read_adapter_config": "model",
    "read_adapter_weights": "model",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)

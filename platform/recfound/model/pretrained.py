"""Loading a backbone (``BackboneConfig``) without network access: model and tokenizer, weights in the run's dtype.

Separate from model/backbone.py so that checking a config does not import transformers' model classes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
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

from recfound.model.backbone import TINY_LAYERS, BackboneConfig, DType
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


def resolve_dtype(dtype: DType, name: str) -> torch.dtype:
    """``auto``: bf16 where the hardware computes it natively, float32 elsewhere (bf16 emulated in float32 is
    slower than float32). A GPU with bf16 qualifies, and so does a CPU with AVX512-BF16 or AMX for a pretrained
    backbone: there bf16 matmuls ran 4x float32's (2 EPYC cores, 819-909 vs 173-215 GFLOP/s) and a SmolLM2-135M
    training step 1.8x. The tiny random backbone stays float32 on a CPU: its 2-layer matrices gain nothing, and
    its tests pin float32 results. Adapters keep float32 weights either way (TMoLEModel)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if name != "tiny" and cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX tiles), as oneDNN's bf16 GEMMs need."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def load_backbone(cfg: BackboneConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) with a pad token set; gradient checkpointing is left to the TMoLE wrapper (see GRM)."""
    dtype = resolve_dtype(cfg.dtype, cfg.name)
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

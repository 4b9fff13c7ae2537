"""An offline, deterministic tokenizer for the ``tiny`` backbone: tests and smoke runs never touch a hub.

Byte-level with no merges: every UTF-8 byte is one token, so the vocabulary is fixed by construction (no
training corpus, no seed) and any string round-trips. Sequences are long, which is fine for toy models.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD = "<pad>"
EOS = "</s>"


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Ids 0/1 are pad/eos; ids 2..257 are the 256 byte symbols in sorted order."""
    vocab = {PAD: 0, EOS: 1}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS)

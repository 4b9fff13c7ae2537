"""Text formats of the two modes and their tokenisation into padded numpy batches.

Each whole sequence is tokenised in one call (so token boundaries match what the backbone saw in pretraining) and
the text / response spans are found from character offsets rather than by tokenising pieces separately. The
functions are pure (tokenizer, lists of str) -> dict of int64 numpy arrays, so Ray Data ``map_batches`` can run
them on CPU workers; the model converts to tensors on its device.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # keeps data workers and losses free of the transformers import
    from transformers import PreTrainedTokenizerBase

USER = "<|user|>\n"
EMBED = "<|embed|>\n"
ASSISTANT = "<|assistant|>\n"
IGNORE_INDEX = -100

PaddingSide = Literal["left", "right"]
Batch = dict[str, np.ndarray]


class Side(str, Enum):
    """Which side of retrieval a text is on: it sets the token budget and the truncation the model trained that
    side with (training, evaluation and serving all encode through ``encode_embedding`` with these)."""

    QUERY = "query"
    """Users, search queries and the anchor item of i2i."""
    ITEM = "item"
    """Catalogue items, embedded once into the index."""

    def keeps_end(self, task: str) -> bool:
        """Whether an over-long text of ``task`` on this side loses its start rather than its end: a u2i query is
        the user's history, oldest first, so its end holds the most recent items, the most predictive of the next
        (cutting the end dropped them from 24 % of the Magazine slice's test users at 128 tokens)."""
        return self is Side.QUERY and task == "u2i"


def embedding_prefix(instruction: str) -> str:
    """Everything before the text; pooled embeddings exclude it."""
    return f"{USER}{instruction}\n{EMBED}" if instruction else EMBED


def prompt_prefix(prompt: str) -> str:
    """The generation context; the model continues it with the response."""
    return f"{USER}{prompt}\n{ASSISTANT}"


def encode_embedding(
    tok: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    texts: Sequence[str],
    max_len: int,
    padding_side: PaddingSide = "right",
    keep_end: bool = False,
) -> Batch:
    """{input_ids, attention_mask, text_mask}, each (B, T) int64; text_mask is 1 exactly on the text's tokens.

    Over-long inputs lose the end of the text, or with ``keep_end`` its start (``Side.keeps_end``); the
    instruction always survives, as it steers the embedding.
    """
    if len(instructions) != len(texts):
        raise ValueError(f"{len(instructions)} instructions for {len(texts)} texts")
    prefixes = [embedding_prefix(instruction) for instruction in instructions]
    rows = _tokenize(tok, [p + t for p, t in zip(prefixes, texts)])
    out = []
    for (ids, offsets), prefix, text in zip(rows, prefixes, texts):
        if keep_end:
            ids, offsets = _fit(ids, offsets, (len(prefix), len(prefix) + len(text)), max_len)
        ids, offsets = ids[:max_len], offsets[:max_len]
        mask = [int(start >= len(prefix) and end > start) for start, end in offsets]
        if text.strip() and not any(mask):  # pooling nothing would embed every such text as the zero vector
            raise ValueError(
                f"the instruction {prefix!r} fills the whole {max_len}-token budget and leaves none of "
                "the text: raise max_query_len / max_passage_len or shorten the instruction"
            )
        out.append((ids, mask))
    ids, attention, text_mask = _pad(out, tok.pad_token_id, 0, padding_side)
    return {"input_ids": ids, "attention_mask": attention, "text_mask": text_mask}


def encode_generative(
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_len: int,
    padding_side: PaddingSide = "right",
) -> Batch:
    """{input_ids, attention_mask, labels}, each (B, T) int64; labels are the ids on response tokens
    (eos included) and -100 elsewhere.

    Over-long sequences lose the start of the prompt body first (the markers and the response are kept), then
    the end of the response.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    prefixes = [prompt_prefix(prompt) for prompt in prompts]
    texts = [p + r + tok.eos_token for p, r in zip(prefixes, responses)]
    out = []
    for (ids, offsets), prompt, prefix in zip(_tokenize(tok, texts), prompts, prefixes):
        ids, offsets = _fit(ids, offsets, (len(USER), len(USER) + len(prompt)), max_len)
        labels = [i if start >= len(prefix) and end > start else IGNORE_INDEX for i, (start, end) in zip(ids, offsets)]
        out.append((ids, labels))
    ids, attention, labels = _pad(out, tok.pad_token_id, IGNORE_INDEX, padding_side)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def encode_prompt(
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_len: int | None = None,
    padding_side: PaddingSide = "left",
) -> Batch:
    """{input_ids, attention_mask}, each (B, T) int64, left padded so every row ends where generation starts.

    Over-long prompts lose the start of the prompt body, as in ``encode_generative``.
    """
    out = []
    for (ids, offsets), prompt in zip(_tokenize(tok, [prompt_prefix(p) for p in prompts]), prompts):
        if max_len is not None:
            ids, offsets = _fit(ids, offsets, (len(USER), len(USER) + len(prompt)), max_len)
        out.append((ids, [0] * len(ids)))
    ids, attention, _ = _pad(out, tok.pad_token_id, 0, padding_side)
    return {"input_ids": ids, "attention_mask": attention}


def greedy_decoding(tok: PreTrainedTokenizerBase, max_new_tokens: int) -> dict[str, Any]:
    """``generate`` options for a prompt of ``encode_prompt``: greedy (the decoding the paper evaluates with), up to
    ``max_new_tokens``, stopping at the tokenizer's EOS and padding finished rows with its pad token. The GRM and a
    generative export both decode with these, so an export answers as the model it came from."""
    return {
        "do_sample": False,
        "max_new_tokens": max_new_tokens,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
    }


Offsets = list[tuple[int, int]]


def _tokenize(tok: PreTrainedTokenizerBase, texts: list[str]) -> list[tuple[list[int], Offsets]]:
    if not getattr(tok, "is_fast", False):
        raise TypeError(f"{type(tok).__name__} gives no character offsets; a fast (tokenizers) tokenizer is needed")
    enc = tok(texts, add_special_tokens=True, return_offsets_mapping=True, return_attention_mask=False)
    return [(list(ids), [tuple(o) for o in offs]) for ids, offs in zip(enc["input_ids"], enc["offset_mapping"])]


def _fit(ids: list[int], offsets: Offsets, body: tuple[int, int], max_len: int) -> tuple[list[int], Offsets]:
    """Drop the earliest tokens inside the character span ``body`` until ``max_len`` fits, then cut the end."""
    excess = len(ids) - max_len
    if excess > 0:
        lo, hi = body
        inside = [i for i, (start, end) in enumerate(offsets) if start >= lo and end <= hi and end > start]
        drop = set(inside[:excess])
        ids = [t for i, t in enumerate(ids) if i not in drop]
        offsets = [o for i, o in enumerate(offsets) if i not in drop]
    return ids[:max_len], offsets[:max_len]


def _pad(
    rows: list[tuple[list[int], list[int]]], pad_id: int, pad_extra: int, side: PaddingSide
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    width = max((len(ids) for ids, _ in rows), default=0)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(rows), width), dtype=np.int64)
    extra = np.full((len(rows), width), pad_extra, dtype=np.int64)
    for row, (tokens, values) in enumerate(rows):
        span = slice(0, len(tokens)) if side == "right" else slice(width - len(tokens), width)
        ids[row, span] = tokens
        attention[row, span] = 1
        extra[row, span] = values
    return ids, attention, extra

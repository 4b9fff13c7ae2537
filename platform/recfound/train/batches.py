"""Tokenised task rows: made by Ray Data ``map_batches`` off the training workers (a large task's stream) or by the
worker itself (``worker_rows``: a small task's share), joined into one step's batch.

Rows are right-padded to the mode's fixed token budget so rows of any task and any Ray Data batch stack into one
array; ``collate`` then trims the all-padding tail, so a step pays only for its longest row.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from recfound.model.formats import IGNORE_INDEX, Side, encode_embedding, encode_generative
from recfound.tasks import Mode, mode_of, task_path
from recfound.train.streams import concat_rows

Rows = dict[str, np.ndarray]
TOKENIZE_CHUNK = 256
"""Rows tokenised per call in this process: bounds the raw texts' intermediate arrays, not the result."""

# Which token columns a tokenised row of each mode has, and their padding value.
EMBEDDING_FIELDS = {"q_ids": 0, "q_mask": 0, "q_text": 0, "p_ids": 0, "p_mask": 0, "p_text": 0, "q_key": 0, "p_key": 0}
GENERATIVE_FIELDS = {"ids": 0, "mask": 0, "labels": IGNORE_INDEX}


def _fixed(array: np.ndarray, width: int, fill: int) -> np.ndarray:
    """Right-pad (or cut) the last axis to ``width`` so rows of different Ray Data batches stack."""
    if array.shape[-1] >= width:
        return array[..., :width]
    pad = [(0, 0)] * (array.ndim - 1) + [(0, width - array.shape[-1])]
    return np.pad(array, pad, constant_values=fill)


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str, path: str | None) -> Any:
    """One tokenizer per Ray Data worker process and backbone, not one per batch. Imported here, not at module
    level: the tokenisation tasks then never import torch or the model code."""
    from recfound.model.tokenizer import load_tokenizer

    return load_tokenizer(name, path)


@dataclass(frozen=True)
class Budget:
    """Token budgets of a backbone config (the validated BackboneConfig's max_* fields)."""

    max_query_len: int
    max_passage_len: int
    max_generative_len: int


def tokenize(batch: Rows, backbone: dict[str, Any], task: str) -> Rows:
    """``map_batches`` function: one task's raw rows -> fixed-width token arrays of its mode.

    ``backbone`` is a validated BackboneConfig dumped to a dict (kept a dict so these tasks stay light)."""
    tok = _tokenizer(backbone["name"], backbone["path"])
    cfg = Budget(backbone["max_query_len"], backbone["max_passage_len"], backbone["max_generative_len"])
    if mode_of(task) is Mode.EMBEDDING:
        return _embedding(tok, cfg, batch, task)
    return _generative(tok, cfg, batch)


def _embedding(tok: Any, cfg: Budget, batch: Rows, task: str) -> Rows:
    q = encode_embedding(
        tok,
        list(batch["query_instruction"]),
        list(batch["query"]),
        cfg.max_query_len,
        keep_end=Side.QUERY.keeps_end(task),
    )
    # Passages: the positive, then the row's hard negatives, all under the item-side instruction.
    negatives = [list(n) for n in batch["neg"]]
    k = len(negatives[0]) if negatives else 0
    if any(len(n) != k for n in negatives):
        raise ValueError(f"task {batch['task'][0]}: rows have different numbers of hard negatives")
    texts = [t for pos, negs in zip(batch["pos"], negatives) for t in [pos, *negs]]
    instructions = [i for i in batch["pos_instruction"] for _ in range(1 + k)]
    p = encode_embedding(tok, instructions, texts, cfg.max_passage_len)
    shape = (len(negatives), 1 + k, -1)
    identities = [
        [item or text for item, text in zip([pos_item, *neg_items], [pos, *negs], strict=True)]
        for pos_item, neg_items, pos, negs in zip(batch["pos_item"], batch["neg_items"], batch["pos"], negatives)
    ]
    return pair_keys(list(batch["query"]), identities) | {
        "task": batch["task"],
        "q_ids": _fixed(q["input_ids"], cfg.max_query_len, 0),
        "q_mask": _fixed(q["attention_mask"], cfg.max_query_len, 0),
        "q_text": _fixed(q["text_mask"], cfg.max_query_len, 0),
        "p_ids": _fixed(p["input_ids"].reshape(shape), cfg.max_passage_len, 0),
        "p_mask": _fixed(p["attention_mask"].reshape(shape), cfg.max_passage_len, 0),
        "p_text": _fixed(p["text_mask"].reshape(shape), cfg.max_passage_len, 0),
    }


def pair_keys(queries: Sequence[str], items: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    """Stable 63-bit hashes of query texts (B,) and passage item ids or texts (B, 1 + K) for the loss's
    ``PairKeys``: the same on every worker and run, so they compare across devices."""
    return {"q_key": item_keys(queries), "p_key": np.stack([item_keys(row) for row in items])}


def item_keys(texts: Sequence[str]) -> np.ndarray:
    """Stable 63-bit hash of each item id (or text): the keys of ``pair_keys`` and of the popularity prior."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") >> 1 for t in texts],
        dtype=np.int64,
    )


def _generative(tok: Any, cfg: Budget, batch: Rows) -> Rows:
    width = cfg.max_generative_len
    g = encode_generative(tok, list(batch["prompt"]), list(batch["response"]), width)
    return {
        "task": batch["task"],
        "ids": _fixed(g["input_ids"], width, 0),
        "mask": _fixed(g["attention_mask"], width, 0),
        "labels": _fixed(g["labels"], width, IGNORE_INDEX),
    }


def tokenize_table(table: pa.Table, backbone: dict[str, Any], task: str) -> Rows:
    """``tokenize`` in this process, a chunk at a time, as one block of rows."""
    parts = []
    for start in range(0, table.num_rows, TOKENIZE_CHUNK):
        part = table.slice(start, TOKENIZE_CHUNK)
        parts.append(
            tokenize({c: part.column(c).to_numpy(zero_copy_only=False) for c in part.column_names}, backbone, task)
        )
    return concat_rows(parts)


def train_table(data: str, task: str) -> pa.Table:
    """A task's whole training table, read in this process (a local path or an fsspec URL)."""
    fs, path = url_to_fs(f"{data.rstrip('/')}/{task_path(task, 'train')}")
    return pq.read_table(path, filesystem=fs)


def worker_rows(data: str, task: str, backbone: dict[str, Any], rank: int, world: int) -> Rows:
    """Worker ``rank``'s training rows of a small task, tokenised here: every ``world``-th row from ``rank`` in build
    order, the rows its Ray Data stream read whole gave, without an execution's start-up (train/streams.py)."""
    table = train_table(data, task)
    mine = table.take(np.arange(rank, table.num_rows, world))
    if not mine.num_rows:
        raise RuntimeError(f"task {task}: no training rows for worker {rank} of {world}")
    return tokenize_table(mine, backbone, task)


def _trim(rows: Rows, mask_key: str, keys: list[str]) -> None:
    """Cut every key's last axis to the longest real row (in place); right padding makes this exact."""
    mask = rows[mask_key]
    width = max(1, int(mask.reshape(-1, mask.shape[-1]).any(0).nonzero()[0].max(initial=0)) + 1)
    for key in keys:
        rows[key] = rows[key][..., :width]


def collate(parts: list[Rows], mode: Mode) -> Rows | None:
    """One mode's rows of this step (several tasks) -> one trimmed batch, or None when the step has none."""
    parts = [p for p in parts if len(p["task"])]
    if not parts:
        return None
    fields = EMBEDDING_FIELDS if mode is Mode.EMBEDDING else GENERATIVE_FIELDS
    rows = {key: np.concatenate([p[key] for p in parts]) for key in ["task", *fields]}
    if mode is Mode.EMBEDDING:
        _trim(rows, "q_mask", ["q_ids", "q_mask", "q_text"])
        _trim(rows, "p_mask", ["p_ids", "p_mask", "p_text"])
    else:
        _trim(rows, "mask", list(fields))
    return rows

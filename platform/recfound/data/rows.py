"""Task rows before they are written: one dataclass per task mode, mirroring the parquet columns in tasks.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "valid", "test"]


@dataclass(frozen=True)
class EmbeddingRow:
    """A query text, its positive item text and hard negatives; ``id``/``task`` are given when written."""

    query_instruction: str
    query: str
    pos_instruction: str
    pos: str
    pos_item: str
    neg: tuple[str, ...]
    neg_items: tuple[str, ...]
    user: str = ""
    category: str = ""
    source: str = ""
    query_item: str = ""
    """The catalogue item the query describes (the i2i anchor); empty when the query is not an item."""


@dataclass(frozen=True)
class GenerativeRow:
    """An Alpaca-style prompt and the response the model must produce."""

    prompt: str
    response: str
    user: str = ""
    item: str = ""
    source: str = ""


Row = EmbeddingRow | GenerativeRow
Sample = tuple[Split, Row]


class TaskUnavailable(Exception):
    """The inputs cannot support this task; the message is the reason recorded in the manifest."""

"""Parquet output with explicit schemas: column names and types are the contract in recfound.tasks."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from recfound.data.catalogue import CatalogueItem
from recfound.data.rows import Row
from recfound.data.split import Timeline
from recfound.tasks import EMBEDDING_COLUMNS, GENERATIVE_COLUMNS, INTERACTION_COLUMNS, ITEM_COLUMNS, Mode, mode_of

_LISTS = {"neg", "neg_items"}
SCHEMAS = {
    Mode.EMBEDDING: pa.schema([(c, pa.list_(pa.string()) if c in _LISTS else pa.string()) for c in EMBEDDING_COLUMNS]),
    Mode.GENERATIVE: pa.schema([(c, pa.string()) for c in GENERATIVE_COLUMNS]),
}
ITEM_SCHEMA = pa.schema([(c, pa.string()) for c in ITEM_COLUMNS])
INTERACTION_SCHEMA = pa.schema(
    [
        ("user", pa.string()),
        ("item", pa.string()),
        ("timestamp", pa.int64()),
        ("rating", pa.float64()),
        ("split", pa.string()),
    ]
)
assert tuple(INTERACTION_SCHEMA.names) == INTERACTION_COLUMNS
assert all(tuple(schema.names[:2]) == ("id", "task") for schema in SCHEMAS.values())


def write_parquet(url: str, columns: dict[str, list], schema: pa.Schema) -> None:
    fs, path = url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    table = pa.table({name: columns[name] for name in schema.names}, schema=schema)
    with fsspec.open(url, "wb") as handle:
        pq.write_table(table, handle)


def task_columns(task: str, split: str, rows: Sequence[Row]) -> dict[str, list]:
    """Columns in row order; ids are ``task-split-index`` so they are unique across the whole dataset."""
    names = SCHEMAS[mode_of(task)].names
    columns: dict[str, list] = {"id": [f"{task}-{split}-{i:07d}" for i in range(len(rows))], "task": [task] * len(rows)}
    for name in names[2:]:
        values = [getattr(row, name) for row in rows]
        columns[name] = [list(v) for v in values] if name in _LISTS else values
    return columns


def cap(rows: list[Row], limit: int | None, seed: int, key: str) -> list[Row]:
    """At most ``limit`` rows, chosen by seeded hash so the sample spreads over users and items, order kept."""
    if limit is None or len(rows) <= limit:
        return rows
    rank = sorted(range(len(rows)), key=lambda i: hashlib.sha256(f"{seed}:{key}:{i}".encode()).digest())
    return [rows[i] for i in sorted(rank[:limit])]


def item_columns(catalogue: dict[str, CatalogueItem], extra_texts: dict[str, str]) -> dict[str, list]:
    """Catalogue items, plus items known only by their text (rows from the published GritLM files)."""
    columns: dict[str, list] = {name: [] for name in ITEM_COLUMNS}
    for item in catalogue.values():
        for name, value in zip(ITEM_COLUMNS, (item.item_id, item.title, item.text, item.category, item.brand)):
            columns[name].append(value)
    for item_id in sorted(set(extra_texts) - set(catalogue)):
        for name, value in zip(ITEM_COLUMNS, (item_id, "", extra_texts[item_id], "", "")):
            columns[name].append(value)
    return columns


def interaction_columns(timelines: dict[str, Timeline]) -> dict[str, list]:
    columns: dict[str, list] = {name: [] for name in INTERACTION_COLUMNS}
    for user, timeline in timelines.items():
        for split, event in timeline:
            for name, value in zip(INTERACTION_COLUMNS, (user, event.item, event.timestamp, event.rating, split)):
                columns[name].append(value)
    return columns

"""Parquet output with explicit schemas: column names and types are the contract in recfound.tasks."""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Container
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from recfound.data.catalogue import CatalogueItem
from recfound.data.memory import own_buffers
from recfound.data.rows import Row
from recfound.data.sources import Interaction
from recfound.tasks import (
    EMBEDDING_COLUMNS,
    GENERATIVE_COLUMNS,
    INTERACTION_COLUMNS,
    ITEM_COLUMNS,
    SPLITS,
    Mode,
    mode_of,
    task_path,
)

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


ROW_GROUP_BYTES = 4 << 20
"""Approximate memory of the rows a file holds before writing them as a row group (``_row_size``): a stream of any
length needs about this much, and the many files of a build (every per-user task's splits are open at once) stay
small together."""
_VALUE_BYTES = 64
"""A buffered value's Python overhead beyond its text (object header, the row's dict slot)."""


def _row_size(row: dict[str, Any]) -> int:
    size = _VALUE_BYTES * len(row)
    for value in row.values():
        if isinstance(value, str):
            size += len(value)
        elif isinstance(value, list):
            size += _VALUE_BYTES * len(value) + sum(map(len, value))
    return size


class ParquetStream:
    """One parquet file written a row group at a time as rows arrive; opened at the first row group, so a stream
    closed without rows leaves no file unless ``close(empty=True)`` asks for one."""

    def __init__(self, url: str, schema: pa.Schema):
        self.url, self.schema, self.rows = url, schema, 0
        self._buffer: list[dict[str, Any]] = []
        self._tables: list[pa.Table] = []
        self._bytes = 0
        self._handle: Any = None
        self._writer: pq.ParquetWriter | None = None

    def add(self, row: dict[str, Any]) -> None:
        self._buffer.append(row)
        self.rows += 1
        self._bytes += _row_size(row)
        if self._bytes >= ROW_GROUP_BYTES:
            self._flush()

    def add_table(self, table: pa.Table) -> None:
        """Rows already in Arrow (templated by a Ray task), after any buffered one; copied (``own_buffers``) so that
        waiting for its row group does not keep the whole task result in Ray's object store."""
        self._seal()
        self._tables.append(own_buffers(table.select(self.schema.names).cast(self.schema)))
        self.rows += table.num_rows
        self._bytes += table.nbytes
        if self._bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _seal(self) -> None:
        """The buffered dict rows as one table, ahead of any table added after them: rows keep their order."""
        if self._buffer:
            self._tables.append(pa.Table.from_pylist(self._buffer, schema=self.schema))
            self._buffer = []

    def _flush(self) -> None:
        if self._writer is None:
            fs, path = url_to_fs(self.url)
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self._handle = fsspec.open(self.url, "wb").open()
            self._writer = pq.ParquetWriter(self._handle, self.schema)
        self._seal()
        if self._tables:
            self._writer.write_table(pa.concat_tables(self._tables))
        self._tables, self._bytes = [], 0

    def close(self, empty: bool = True) -> None:
        """Write what is buffered and finish the file (an empty one when no row came and ``empty``)."""
        if self._buffer or self._tables or (empty and self._writer is None):
            self._flush()
        if self._writer is not None:
            self._writer.close()
            self._handle.close()


_NAMED = (("pos_item", "neg_items"), ("pos", "neg"))
"""An embedding row's item ids and their texts: the positive's column and the negatives' list column."""
_FIELDS = {mode: tuple(schema.names[2:]) for mode, schema in SCHEMAS.items()}
"""A row's columns after id and task, per mode (read once: ``pa.Schema.names`` builds a new list per call)."""


def row_id(task: str, split: str, index: int) -> str:
    """Ids are ``task-split-index`` so they are unique across the whole dataset."""
    return f"{task}-{split}-{index:07d}"


def row_columns(task: str, row: Row) -> dict[str, Any]:
    """A row's columns but its id (the index in its split file, known where the file is written)."""
    values = {
        name: list(getattr(row, name)) if name in _LISTS else getattr(row, name) for name in _FIELDS[mode_of(task)]
    }
    return {"task": task, **values}


class TaskFiles:
    """A task's split files, streamed: rows are written as they are templated, in arrival order, and under a cap
    each split keeps ``limit`` rows chosen by seeded hash of their position (spread over users and items, order
    kept), found once the split's length is known by re-reading its file a row group at a time."""

    def __init__(self, out: str, task: str, limit: int | None, seed: int, known: Container[str] = ()):
        self.task, self.limit, self.seed, self._known = task, limit, seed, known
        self.texts: dict[str, str] = {}
        """Item id -> text of every item a kept embedding row names that is not ``known`` (the catalogue's items,
        whose texts items.parquet takes from the catalogue: a copy here grew the driver with the catalogue)."""
        schema = SCHEMAS[mode_of(task)]
        self._streams = {s: ParquetStream(self._url(out, s), schema) for s in SPLITS}
        self._out = out

    def _url(self, out: str, split: str) -> str:
        return f"{out}/{task_path(self.task, split)}" + (".uncapped" if self.limit is not None else "")

    def add(self, split: str, row: Row) -> None:
        stream = self._streams[split]
        columns = {"id": row_id(self.task, split, stream.rows), **row_columns(self.task, row)}
        stream.add(columns)
        if self.limit is None:
            self._note(columns)

    def add_table(self, split: str, table: pa.Table) -> None:
        """Rows templated elsewhere (``user_rows``), without ids: numbered here, after the rows already added."""
        stream = self._streams[split]
        ids = pa.array([row_id(self.task, split, i) for i in range(stream.rows, stream.rows + table.num_rows)])
        table = table.add_column(0, "id", ids)
        stream.add_table(table)
        if self.limit is None and "pos_item" in table.column_names:
            items, texts = (pa.concat_arrays([*table[a].chunks, *pc.list_flatten(table[b]).chunks]) for a, b in _NAMED)
            self._note_unknown(items.to_pylist(), texts.to_pylist())

    def close(self) -> dict[str, int]:
        """Rows written per split; no file at all when the task got no row."""
        empty = not any(stream.rows for stream in self._streams.values())
        for stream in self._streams.values():
            stream.close(empty=not empty)
        if empty or self.limit is None:
            return {} if empty else {s: stream.rows for s, stream in self._streams.items()}
        return {split: self._cap(split, stream) for split, stream in self._streams.items()}

    def _cap(self, split: str, stream: ParquetStream) -> int:
        assert self.limit is not None
        key = f"{self.task}:{split}"
        digest = lambda i: hashlib.sha256(f"{self.seed}:{key}:{i}".encode()).digest()  # noqa: E731
        kept = set(heapq.nsmallest(self.limit, range(stream.rows), key=digest))
        capped = ParquetStream(f"{self._out}/{task_path(self.task, split)}", stream.schema)
        fs, path = url_to_fs(stream.url)
        with fs.open(path, "rb") as handle:
            for batch in pq.ParquetFile(handle).iter_batches():
                for row in batch.to_pylist():
                    index = int(row["id"].rsplit("-", 1)[1])
                    if index in kept:
                        row["id"] = row_id(self.task, split, capped.rows)
                        capped.add(row)
                        self._note(row)
        capped.close()
        fs.rm(path)
        return capped.rows

    def _note(self, row: dict[str, Any]) -> None:
        if "pos_item" in row:
            self._note_unknown([row["pos_item"], *row["neg_items"]], [row["pos"], *row["neg"]])

    def _note_unknown(self, items: list[str], texts: list[str]) -> None:
        self.texts.update((i, t) for i, t in zip(items, texts, strict=True) if i not in self._known)


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


def interaction_row(user: str, split: str, event: Interaction) -> dict[str, Any]:
    return dict(zip(INTERACTION_COLUMNS, (user, event.item, event.timestamp, event.rating, split), strict=True))

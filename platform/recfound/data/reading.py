"""Raw JSON-lines files -> Ray datasets: one streaming read task per file, parsed by ``sources.py``'s parsers.

A file is one task because its first usable line fixes its schema and its line numbers name its bad rows; files
are read in parallel. Under ``on_bad_rows=error`` a task raises the first bad row it meets (the build fails fast,
naming file, line and field); under ``skip`` it streams the bad rows beside the good ones, and the driver applies
``max_bad_fraction`` per file once every file is read.

Each task also ends with its file's distinct ids (reviews: items; metadata: item ids), so what the driver needs
before the next stage (bad rows, line counts, the reviewed items, how many metadata ids repeat) comes back in one
small pass instead of one Ray Data execution each: on 2 cores every execution costs tenths of a second.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data.block import BlockMetadata
from ray.data.context import ShuffleStrategy
from ray.data.datasource import Datasource, ReadTask

from recfound.data.sources import BadRowPolicy, BadRows, DataError, Item, items_in, reviews_in
from recfound.ray_start import start_ray

ROW, BAD, LINES, IDS = "row", "bad", "lines", "ids"
"""Row kinds in a read: a record; a bad row (its quarantine record as JSON); a file's line count (in ``line``); one
of the file's distinct ids (in the role's id column)."""
BLOCK_ROWS = 4096
"""Rows per streamed block: small enough to keep a read task's memory flat, big enough for Arrow to pay off."""
ROWS_PER_PARTITION = 250_000
"""Rows per shuffle partition of a group-by (see ``partitions``)."""
MAX_BLOCK_BYTES = 16 * 2**20
"""Ray Data's largest block in a build (its default 128 MiB). A file's rows arrive as blocks this size, and a
sort-based group-by makes one partition per input block, so it bounds a de-duplication task: with the default, an
8-file dump was 8 blocks at any size, and at 4M reviews one task's group-by took 1.9 GB."""
_TAIL = [("file_index", pa.int32()), ("line", pa.int64()), ("kind", pa.string()), ("bad", pa.string())]
_TEXTS = pa.list_(pa.string())
REVIEW_SCHEMA = pa.schema(
    [
        ("user", pa.string()),
        ("item", pa.string()),
        ("timestamp", pa.int64()),
        ("rating", pa.float64()),
        ("summary", pa.string()),
        ("text", pa.string()),
        *_TAIL,
    ]
)
META_SCHEMA = pa.schema(
    [(f.name, _TEXTS if f.type == "tuple[str, ...]" else pa.string()) for f in fields(Item)] + _TAIL
)
ORDER = [("file_index", "ascending"), ("line", "ascending")]
"""Input order: file, then line. It breaks timestamp ties and decides which repeated metadata row wins."""


@dataclass(frozen=True)
class Role:
    """How one kind of input file is parsed (a per-file generator of (line, record)) and stored."""

    parse: Callable[[str, BadRows], Iterator[tuple[int, Any]]]
    schema: pa.Schema
    key: str
    """The id column whose distinct values a read reports (IDS rows)."""


ROLES = {"reviews": Role(reviews_in, REVIEW_SCHEMA, "item"), "meta": Role(items_in, META_SCHEMA, "item_id")}


def _record(
    index: int, line: int, kind: str, values: dict[str, Any] | None = None, bad: str | None = None
) -> dict[str, Any]:
    """One row of a read block; the columns a kind does not use are null."""
    return {**(values or {}), "file_index": index, "line": line, "kind": kind, "bad": bad}


def _read_file(index: int, url: str, role: str, policy: BadRowPolicy) -> Iterator[pa.Table]:
    """One file as blocks of records, then its bad rows (under skip), its count of non-blank lines and its distinct
    ids."""
    bad = BadRows(policy)  # max_fraction 1: the driver applies the real limit, once the quarantine is complete
    spec, rows, lines, ids = ROLES[role], [], 0, set()
    for line, record in spec.parse(url, bad):
        values = asdict(record)
        ids.add(values[spec.key])
        rows.append(_record(index, line, ROW, values))
        if len(rows) + len(bad.rows) >= BLOCK_ROWS:
            lines += len(rows) + len(bad.rows)
            yield pa.Table.from_pylist(rows + _bad(index, bad), schema=spec.schema)
            rows = []
    lines += len(rows) + len(bad.rows)
    yield pa.Table.from_pylist([*rows, *_bad(index, bad), _record(index, lines, LINES)], schema=spec.schema)
    ids_column = pa.array(sorted(ids), pa.string())
    tail = {name: pa.nulls(len(ids_column), spec.schema.field(name).type) for name in spec.schema.names}
    tail.update({spec.key: ids_column, "file_index": pa.array([index] * len(ids_column), pa.int32())})
    tail.update({"line": pa.array([0] * len(ids_column), pa.int64()), "kind": pa.array([IDS] * len(ids_column))})
    yield pa.table(tail, schema=spec.schema)


def _bad(index: int, bad: BadRows) -> list[dict[str, Any]]:
    """The bad rows collected since the last block, handed on (a damaged file must not grow a task's memory)."""
    out = [_record(index, row["line"], BAD, bad=json.dumps(row)) for row in bad.rows]
    bad.rows.clear()
    return out


class JsonLines(Datasource):
    """Gzip or plain JSON lines through fsspec (local, s3://, gs://), one read task per file."""

    def __init__(self, files: Sequence[str], role: str, policy: BadRowPolicy):
        self.files, self.role, self.policy = list(files), role, policy

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        return [
            ReadTask(
                partial(_read_file, index, url, self.role, self.policy),
                BlockMetadata(num_rows=None, size_bytes=None, input_files=[url], exec_stats=None),
                schema=ROLES[self.role].schema,
            )
            for index, url in enumerate(self.files)
        ]


def _of_kind(batch: pa.Table, kinds: tuple[str, ...]) -> pa.Table:
    return batch.filter(pc.is_in(batch["kind"], pa.array(kinds)))


def of_kind(ds: ray.data.Dataset, *kinds: str) -> ray.data.Dataset:
    return ds.map_batches(_of_kind, fn_kwargs={"kinds": kinds}, batch_format="pyarrow", batch_size=None)


def _read(files: Sequence[str], role: str, bad: BadRows) -> ray.data.Dataset:
    return ray.data.read_datasource(JsonLines(files, role, bad.policy), override_num_blocks=len(files))  # per file


def _account(side: list[dict[str, Any]], files: Sequence[str], role: str, bad: BadRows) -> tuple[int, list[str]]:
    """The bad rows join ``bad`` in input order and a file past ``max_bad_fraction`` stops the build; returns how
    many well-formed records the files hold and their distinct ids, sorted."""
    side.sort(key=lambda r: (r["file_index"], r["kind"] == LINES, r["line"]))
    lines = {r["file_index"]: r["line"] for r in side if r["kind"] == LINES}
    bad.rows += [json.loads(r["bad"]) for r in side if r["kind"] == BAD]
    for index, url in enumerate(files):
        bad.check(url, lines[index])
    ids = sorted({r[ROLES[role].key] for r in side if r["kind"] == IDS})
    return sum(lines.values()) - sum(r["kind"] == BAD for r in side), ids


def read_role(files: Sequence[str], role: str, bad: BadRows) -> tuple[ray.data.Dataset, int, list[str]]:
    """The well-formed records of ``files`` (materialized: later stages pass over them more than once), how many
    there are and their distinct ids."""
    ds = _read(files, role, bad).materialize()
    count, ids = _account(of_kind(ds, BAD, LINES, IDS).take_all(), files, role, bad)
    return of_kind(ds, ROW), count, ids


def _wanted(batch: pa.Table, key: str, ids: pa.Array) -> pa.Table:
    return batch.filter(pc.or_(pc.not_equal(batch["kind"], ROW), pc.is_in(batch[key], ids)))


def read_wanted(
    files: Sequence[str], role: str, bad: BadRows, wanted: Sequence[str]
) -> tuple[list[dict[str, Any]], int, list[str]]:
    """As ``read_role``, in one pass that brings back only the records whose id is ``wanted`` (metadata: the
    reviewed items; a dump describes many more)."""
    key = ROLES[role].key
    fn_kwargs = {"key": key, "ids": pa.array(wanted, pa.string())}
    rows = _read(files, role, bad).map_batches(_wanted, fn_kwargs=fn_kwargs, batch_format="pyarrow").take_all()
    count, ids = _account([r for r in rows if r["kind"] != ROW], files, role, bad)
    return [r for r in rows if r["kind"] == ROW], count, ids


def partitions(rows: int) -> int:
    """Shuffle partitions for a group-by over ``rows``: one per ``ROWS_PER_PARTITION`` so a partition's memory is
    bounded, and a small slice is not spread over 200 partitions of start-up cost. Hash shuffles only: the
    sort-based ones the pipeline runs (``sort_shuffles``) make as many partitions as their input has blocks, of
    sampled ranges holding about a block's rows each."""
    return max(1, rows // ROWS_PER_PARTITION)


def item(row: dict[str, Any]) -> Item:
    """A metadata row back as the Item the catalogue is built from (Arrow lists become tuples)."""
    return Item(*(tuple(v) if isinstance(v, list) else v for v in (row[f.name] for f in fields(Item))))


@contextlib.contextmanager
def ray_errors() -> Iterator[None]:
    """A DataError raised in a read or map task, re-raised as itself: the message names file, line and field, not
    the worker's traceback."""
    try:
        yield
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, DataError):
            raise err.cause from None
        raise


@contextlib.contextmanager
def pipeline_context() -> Iterator[None]:
    """The build's Ray Data settings, restored after (a training job's own Ray Data keeps its defaults):

    - group-bys as sort-based shuffles (tasks) instead of Ray 2.60's default hash shuffle (actors started per
      shuffle). Measured on the synthetic default build, Ray already up, 2 loaded cores: 2.5 s a build instead of
      6 to 34 s, and 1.6 GiB peak resident memory (driver and Ray) instead of 2.0;
    - blocks delivered in order: a sort-based group-by's partitions hold ascending key ranges, so the
      de-duplication's output reaches the driver one user after another in user order, which is what lets the
      driver split and template one user's timeline at a time (``split.user_timelines`` checks it);
    - blocks of at most ``MAX_BLOCK_BYTES``, so that a task's memory does not grow with the dump.
    """
    context = ray.data.DataContext.get_current()
    before = context.shuffle_strategy, context.execution_options.preserve_order, context.target_max_block_size
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    context.execution_options.preserve_order = True
    context.target_max_block_size = MAX_BLOCK_BYTES
    try:
        yield
    finally:
        context.shuffle_strategy, context.execution_options.preserve_order, context.target_max_block_size = before


@contextlib.contextmanager
def local_ray(object_store_memory: int | None = None) -> Iterator[None]:
    """The Ray the pipeline runs on: the caller's (a training job, ``ray job submit``'s cluster) when one is up,
    else a local one for this build only (its object store ``object_store_memory`` bytes, None: Ray's default),
    shut down after it so the caller can still start its own. A local one lets idle workers exit: the two pooled
    workers that templated a 4M-review dump held 1.5 GiB (the catalogue, what their tasks left) through the
    cross-user tasks after it."""
    if ray.is_initialized():
        yield
        return
    start_ray(dashboard=False, object_store_memory=object_store_memory, reap_idle_workers=True, echo=False)
    _quiet_data_console()
    try:
        yield
    finally:
        ray.shutdown()


def _quiet_data_console() -> None:
    """A build's terminal shows its own table and errors: Ray Data's execution plans and progress lines (INFO on
    the ``ray.data`` logger's console handler) still go to ``ray-data.log`` in the session's logs, not the
    terminal. Only a build that starts its own Ray does this; a caller's Ray keeps its caller's console."""
    from ray._private.log import PlainRayHandler

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, PlainRayHandler):
            handler.setLevel(logging.WARNING)

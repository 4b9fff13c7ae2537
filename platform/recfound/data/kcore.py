"""The reviews' Ray Data stages between reading and the driver: item variants merged, each user's first interaction
with an item kept, then the iterated k-core.

Few executions by design: each Ray Data execution, a shuffle most, costs tenths of a second to seconds on a loaded
2-core machine, where the test suite runs ~50 builds, so the stages are arranged to need as few as the result
allows:

- de-duplication is one group-by on the user (a repeat is a repeat of one user's), which also merges variants;
- the k-core is found on the (user, item) projection, materialised once: each round is one map over its blocks,
  each block counting its users' and items' degrees (a combiner), summed on the driver as they arrive (Arrow
  group-bys, about two rows per vertex held); the next round filters the projection with the vertices that keep
  their place. A round used to be a sort-based group-by: 3 s each on 2 cores at 100k reviews, where the map takes
  under one. The k-core is the sub-graph those vertices induce, so the reviews are filtered once, at the end, with
  the last round's vertices.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from recfound.data.reading import partitions

CHRONOLOGICAL = [("timestamp", "ascending"), ("file_index", "ascending"), ("line", "ascending")]
"""A user's events in time order, ties broken by input order (file, line), never by the order a shuffle delivers."""
USER, ITEM = "user", "item"
"""The ``side`` of a vertex in a degree count."""


def _first_of_each_item(events: pa.Table, aliases: Mapping[str, str]) -> pa.Table:
    """One user's events, variants merged: the chronologically first event of each item (a repeat would put the
    test target in the history)."""
    if aliases:
        items = pa.array([aliases.get(i, i) for i in events[ITEM].to_pylist()], pa.string())
        events = events.set_column(events.schema.get_field_index(ITEM), ITEM, items)
    events = events.sort_by([(ITEM, "ascending"), *CHRONOLOGICAL])
    items = events[ITEM].to_numpy(zero_copy_only=False)
    first = np.ones(len(items), dtype=bool)
    first[1:] = items[1:] != items[:-1]
    return events.filter(pa.array(first))


def dedupe(reviews: ray.data.Dataset, rows: int, aliases: Mapping[str, str]) -> ray.data.MaterializedDataset:
    """Each user's first interaction with each (merged) item, materialised: the k-core reads its projection and
    the driver its rows."""
    grouped = reviews.groupby(USER, num_partitions=partitions(rows))
    unique = grouped.map_groups(_first_of_each_item, fn_kwargs={"aliases": dict(aliases)}, batch_format="pyarrow")
    return unique.map_batches(_contiguous, batch_format="pyarrow", batch_size=None).materialize()


def _contiguous(block: pa.Table) -> pa.Table:
    """``block`` with one chunk per column. A group-by's output block stacks one table per user as chunks of a few
    rows each: on a 250k-review dump, ~3,000 chunks and ~120k buffers per 5 MB block, each buffer a Python object
    on whichever process fetches the block (49 MB of them on the driver), and every later pass paid per chunk."""
    return block.combine_chunks()


def _pairs(batch: pa.Table) -> pa.Table:
    return batch.select([USER, ITEM])


def _within(batch: pa.Table, users: pa.Array, items: pa.Array) -> pa.Table:
    return batch.filter(pc.and_(pc.is_in(batch[USER], users), pc.is_in(batch[ITEM], items)))


DEGREES = pa.schema([("side", pa.string()), ("key", pa.string()), ("degree", pa.int64())])
"""A degree count. Counted with ``use_threads=False``: Acero's threaded group-by failed in a Ray Data task under the
test suite ("thread index 10 is out of range [0, 10)"); a block's count needs no thread pool."""


def _degrees(batch: pa.Table) -> pa.Table:
    """A block's vertex degrees (side, key, degree): each row counts once for its user and once for its item."""
    return pa.concat_tables([_count(batch[side], side) for side in (USER, ITEM)])


def _count(keys: pa.ChunkedArray, side: str) -> pa.Table:
    counted = pa.table({"key": keys}).group_by("key", use_threads=False).aggregate([("key", "count")])
    columns = [pa.repeat(side, counted.num_rows), counted["key"], counted["key_count"]]
    return pa.Table.from_arrays(columns, schema=DEGREES)


def _sum(degrees: list[pa.Table]) -> pa.Table:
    summed = pa.concat_tables(degrees).group_by(["side", "key"], use_threads=False).aggregate([("degree", "sum")])
    return summed.rename_columns(DEGREES.names).cast(DEGREES)


def _total_degrees(blocks: Iterable[pa.Table]) -> pa.Table:
    """The blocks' degrees summed per vertex, merged whenever the pending blocks outgrow the running total, so the
    driver holds about two rows per vertex (an item appears in many blocks, a user in one)."""
    total, pending, size = DEGREES.empty_table(), [], 0
    for block in blocks:
        pending.append(block)
        size += block.num_rows
        if size > max(total.num_rows, 1 << 16):
            total, pending, size = _sum([total, *pending]), [], 0
    return _sum([total, *pending])


Vertices = tuple[pa.Array, pa.Array] | None
"""The users and items whose rows are kept; None keeps every row."""


def kcore_vertices(unique: ray.data.MaterializedDataset, k: int) -> Vertices:
    """The users and items of the ``k``-core of ``unique`` (None: every row is in it): rounds that drop every vertex
    with fewer than ``k`` interactions among the rows left, until one drops none. Removal cascades; the k-core is
    unique, so dropping both sides at once ends where alternating user and item passes would."""
    pairs = unique.map_batches(_pairs, batch_format="pyarrow", batch_size=None).materialize()
    vertices: Vertices = None
    while True:
        blocks = within(pairs, vertices).map_batches(_degrees, batch_format="pyarrow", batch_size=None)
        degrees = _total_degrees(blocks.iter_batches(batch_format="pyarrow", batch_size=None))
        keep = pc.greater_equal(degrees["degree"], k)
        if pc.all(keep).as_py() is not False:
            return vertices
        kept = degrees.filter(keep)
        users, items = (kept.filter(pc.equal(kept["side"], side))["key"] for side in (USER, ITEM))
        vertices = users.combine_chunks(), items.combine_chunks()


def within(rows: ray.data.Dataset, vertices: Vertices) -> ray.data.Dataset:
    """The rows between the given users and items (all of them for None)."""
    if vertices is None:
        return rows
    users, items = vertices
    return rows.map_batches(_within, fn_kwargs={"users": users, "items": items}, batch_format="pyarrow")

"""The reviews' Ray Data stages between reading and the driver: item variants merged, each user's first interaction
with an item kept, then the iterated k-core.

Few executions by design: each Ray Data execution, a shuffle most, costs tenths of a second to seconds on a loaded
2-core machine, where the test suite runs ~50 builds, so the stages are arranged to need as few as the result
allows:

- de-duplication is one group-by on the user (a repeat is a repeat of one user's), which also merges variants;
- the k-core is found on the (user, item) projection, materialised once: each round is one group-by counting
  users' and items' degrees together, and only the vertices that keep their place come back to the driver; the
  next round filters the projection with them. The k-core is the sub-graph those vertices induce, so the
  reviews are filtered once, at the end, with the last round's vertices.
"""

from __future__ import annotations

from collections.abc import Mapping

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
    return unique.materialize()


def _pairs(batch: pa.Table) -> pa.Table:
    return batch.select([USER, ITEM])


def _within(batch: pa.Table, users: pa.Array, items: pa.Array) -> pa.Table:
    return batch.filter(pc.and_(pc.is_in(batch[USER], users), pc.is_in(batch[ITEM], items)))


def _vertices(batch: pa.Table) -> pa.Table:
    """Each row twice, as its user and as its item: one group-by counts both sides' degrees."""
    side = pa.chunked_array([pa.repeat(USER, batch.num_rows), pa.repeat(ITEM, batch.num_rows)], pa.string())
    keys = pa.chunked_array([*batch[USER].chunks, *batch[ITEM].chunks], pa.string())
    return pa.table({"side": side, "key": keys})


def _verdict(degrees: pa.Table, k: int) -> pa.Table:
    """The vertices that keep their place, and one row (side null) with how many do not."""
    keep = pc.greater_equal(degrees["count()"], k)
    kept = degrees.filter(keep)
    tally = {"side": pa.nulls(1, pa.string()), "key": pa.nulls(1, pa.string())}
    tally["dropped"] = pa.array([degrees.num_rows - kept.num_rows], pa.int64())
    rows = {"side": kept["side"], "key": kept["key"], "dropped": pa.nulls(kept.num_rows, pa.int64())}
    return pa.concat_tables([pa.table(rows), pa.table(tally)])


Vertices = tuple[pa.Array, pa.Array] | None
"""The users and items whose rows are kept; None keeps every row."""


def kcore_vertices(unique: ray.data.MaterializedDataset, k: int) -> Vertices:
    """The users and items of the ``k``-core of ``unique`` (None: every row is in it): rounds that drop every vertex
    with fewer than ``k`` interactions among the rows left, until one drops none. Removal cascades; the k-core is
    unique, so dropping both sides at once ends where alternating user and item passes would."""
    pairs = unique.map_batches(_pairs, batch_format="pyarrow", batch_size=None).materialize()
    vertices: Vertices = None
    while True:
        degrees = (
            within(pairs, vertices)
            .map_batches(_vertices, batch_format="pyarrow", batch_size=None)
            .groupby(["side", "key"], num_partitions=partitions(2 * pairs.count()))
            .count()
        )
        rows = degrees.map_batches(_verdict, fn_kwargs={"k": k}, batch_format="pyarrow", batch_size=None).take_all()
        if not sum(row["dropped"] for row in rows if row["side"] is None):
            return vertices
        kept: dict[str, list[str]] = {USER: [], ITEM: []}
        for row in rows:
            if row["side"] is not None:
                kept[row["side"]].append(row["key"])
        vertices = pa.array(sorted(kept[USER]), pa.string()), pa.array(sorted(kept[ITEM]), pa.string())


def within(rows: ray.data.Dataset, vertices: Vertices) -> ray.data.Dataset:
    """The rows between the given users and items (all of them for None)."""
    if vertices is None:
        return rows
    users, items = vertices
    return rows.map_batches(_within, fn_kwargs={"users": users, "items": items}, batch_format="pyarrow")

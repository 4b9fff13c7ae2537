"""Train/valid/test assignment: leave-last-out per user for behaviour tasks, a seeded hash for item-level rows; and
the interaction stages before it (de-duplication, k-core) as Ray Data group-bys over the reviews.

All are pure functions of (inputs, seed), which is what makes two builds byte-identical: a user's events are ordered
by time, then by input order (file, line), never by the order a shuffle delivers them in.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import ray.data

from recfound.data.reading import partitions
from recfound.data.rows import Split
from recfound.data.sources import Interaction

Timeline = list[tuple[Split, Interaction]]


def hash_split(seed: int, key: str, holdout: float) -> Split:
    """A stable split for a row key: ``holdout`` of keys go to test, as many to valid, the rest to train."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    unit = int.from_bytes(digest[:8], "big") / 2**64
    if unit < holdout:
        return "test"
    if unit < 2 * holdout:
        return "valid"
    return "train"


CHRONOLOGICAL = [("timestamp", "ascending"), ("file_index", "ascending"), ("line", "ascending")]


def _first(group: pa.Table) -> pa.Table:
    return group.sort_by(CHRONOLOGICAL).slice(0, 1)


def dedupe(reviews: ray.data.Dataset, rows: int) -> ray.data.Dataset:
    """Keep each user's first interaction with an item: a repeat would put the test target in the history."""
    return reviews.groupby(["user", "item"], num_partitions=partitions(rows)).map_groups(_first, batch_format="pyarrow")


def _at_least(group: pa.Table, k: int) -> pa.Table:
    return group if group.num_rows >= k else group.slice(0, 0)


def kcore(interactions: ray.data.Dataset, k: int) -> ray.data.Dataset:
    """Drop users and items with fewer than ``k`` interactions until none is left (removal cascades): a user pass
    and an item pass per round, until a round removes nothing. The k-core is unique, so the order of the passes
    does not change the result."""
    rows = interactions.materialize()
    before = rows.count()
    while before:
        for key in ("user", "item"):
            grouped = rows.groupby(key, num_partitions=partitions(before))
            rows = grouped.map_groups(_at_least, fn_kwargs={"k": k}, batch_format="pyarrow")
        rows = rows.materialize()
        if rows.count() == before:
            break
        before = rows.count()
    return rows


def _leave_last_out(events: pa.Table) -> pa.Table:
    events = events.sort_by(CHRONOLOGICAL)
    n = events.num_rows
    splits: list[Split] = ["train"] * max(n - 2, 0) + ["valid", "test"][-n:]
    return events.append_column("split", pa.array(splits, pa.string()))


def leave_last_out(interactions: ray.data.Dataset, rows: int) -> ray.data.Dataset:
    """Per user, chronologically: last interaction -> test, second to last -> valid, the rest -> train."""
    grouped = interactions.groupby("user", num_partitions=partitions(rows))
    return grouped.map_groups(_leave_last_out, batch_format="pyarrow")


def timelines(split: ray.data.Dataset) -> dict[str, Timeline]:
    """The split interactions gathered per user, users sorted: the in-memory form the task templates draw from."""
    events: dict[str, list[tuple[int, int, int, Split, Interaction]]] = {}
    for batch in split.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            event = Interaction(row["user"], row["item"], row["timestamp"], row["rating"], row["summary"], row["text"])
            order = (row["timestamp"], row["file_index"], row["line"])
            events.setdefault(row["user"], []).append((*order, row["split"], event))
    return {user: [(e[3], e[4]) for e in sorted(events[user], key=lambda e: e[:3])] for user in sorted(events)}

"""Train/valid/test assignment: leave-last-out per user for behaviour tasks, a seeded hash for item-level rows.

All are pure functions of (inputs, seed), which is what makes two builds byte-identical: a user's events are ordered
by time, then by input order (file, line), never by the order a shuffle delivers them in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import pyarrow as pa

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


def leave_last_out(events: list[Interaction]) -> Timeline:
    """One user's events in time order: the last -> test, the second to last -> valid, the rest -> train."""
    splits: list[Split] = ["train"] * max(len(events) - 2, 0) + ["valid", "test"][-len(events) :]
    return list(zip(splits, events, strict=True))


def timelines(batches: Iterable[pa.Table]) -> dict[str, Timeline]:
    """The k-core's reviews gathered per user (users sorted) and split. Done here, not in a group-by: the driver
    orders every user's events to hand the templates whole timelines anyway, and the split is a position in that
    order, so a shuffle of every kept row would only deliver what this sort already knows."""
    events: dict[str, list[tuple[int, int, int, Interaction]]] = {}
    for batch in batches:
        for row in batch.to_pylist():
            event = Interaction(row["user"], row["item"], row["timestamp"], row["rating"], row["summary"], row["text"])
            events.setdefault(row["user"], []).append((row["timestamp"], row["file_index"], row["line"], event))
    return {user: leave_last_out([e[3] for e in sorted(events[user], key=lambda e: e[:3])]) for user in sorted(events)}

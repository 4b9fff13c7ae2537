"""Train/valid/test assignment: leave-last-out per user for behaviour tasks, a seeded hash for item-level rows.

All are pure functions of (inputs, seed), which is what makes two builds byte-identical: a user's events are ordered
by time, then by input order (file, line), never by the order a shuffle delivers them in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import pyarrow as pa

from recfound.data.memory import release_unused
from recfound.data.rows import Split
from recfound.data.sources import Interaction

Timeline = list[tuple[Split, Interaction]]
ROWS_AT_ONCE = 1024


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


def user_timelines(batches: Iterable[pa.Table]) -> Iterator[tuple[str, Timeline]]:
    """Each user's split timeline, one user at a time in ascending user order, from batches in which each user's
    rows are contiguous and users ascend (the de-duplication group-by's output, read in order). The driver holds one
    user's events, not the dump's: what grows with the input stays in Ray's blocks."""
    user: str | None = None
    events: list[tuple[int, int, int, Interaction]] = []
    for batch in batches:
        for row in _rows(batch):
            if row["user"] != user:
                if user is not None:
                    if row["user"] < user:
                        raise RuntimeError(
                            f"reviews reached the split out of user order: {row['user']!r} after {user!r}"
                        )
                    yield user, _split(events)
                user, events = row["user"], []
            event = Interaction(row["user"], row["item"], row["timestamp"], row["rating"], row["summary"], row["text"])
            events.append((row["timestamp"], row["file_index"], row["line"], event))
        release_unused()  # what the last block's users freed, before the next block arrives
    if user is not None:
        yield user, _split(events)


def _rows(batch: pa.Table) -> Iterator[dict]:
    """A block's rows as dicts, ``ROWS_AT_ONCE`` converted at a time: the block stays compact Arrow, and only a slice
    of it is Python objects (a whole block at once would be a block's worth of them)."""
    for chunk in batch.to_batches(max_chunksize=ROWS_AT_ONCE):
        yield from chunk.to_pylist()


def _split(events: list[tuple[int, int, int, Interaction]]) -> Timeline:
    return leave_last_out([e[3] for e in sorted(events, key=lambda e: e[:3])])

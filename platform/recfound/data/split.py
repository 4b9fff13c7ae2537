"""Train/valid/test assignment: leave-last-out per user for behaviour tasks, a seeded hash for item-level rows.

Both are pure functions of (inputs, seed), which is what makes two builds byte-identical.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict

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


def dedupe(interactions: list[Interaction]) -> tuple[list[Interaction], int]:
    """Keep each user's first interaction with an item: a repeat would put the test target in the history."""
    ordered = sorted(interactions, key=lambda r: r.timestamp)  # stable: file order breaks ties
    seen: set[tuple[str, str]] = set()
    out = []
    for row in ordered:
        if (row.user, row.item) not in seen:
            seen.add((row.user, row.item))
            out.append(row)
    return out, len(interactions) - len(out)


def kcore(interactions: list[Interaction], k: int) -> list[Interaction]:
    """Drop users and items with fewer than ``k`` interactions until none is left (removal cascades)."""
    rows = interactions
    while True:
        users = Counter(r.user for r in rows)
        items = Counter(r.item for r in rows)
        kept = [r for r in rows if users[r.user] >= k and items[r.item] >= k]
        if len(kept) == len(rows):
            return kept
        rows = kept


def leave_last_out(interactions: list[Interaction]) -> dict[str, Timeline]:
    """Per user, chronologically: last interaction -> test, second to last -> valid, the rest -> train."""
    by_user: dict[str, list[Interaction]] = defaultdict(list)
    for row in sorted(interactions, key=lambda r: r.timestamp):
        by_user[row.user].append(row)
    timelines = {}
    for user in sorted(by_user):
        rows = by_user[user]
        splits: list[Split] = ["train"] * max(len(rows) - 2, 0) + ["valid", "test"][-len(rows) :]
        timelines[user] = list(zip(splits, rows, strict=True))
    return timelines

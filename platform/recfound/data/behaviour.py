"""What the task templates need from all users' timelines at once, gathered in one pass over them (Ray tasks on
chunks of whole users, merged in user order).

Per-user rows (histories, options, reviews) are templated from one timeline at a time (``user_rows.py``); the few
facts that cross users are kept here, bounded by the catalogue rather than by the reviews where they can be: an
item's title of last resort, the earliest training reviews of the items questions ask about, and which items
follow each other in training histories (one Arrow row per distinct pair: i2i has a row for each). Which summaries are
generic is counted by Ray (``generic_summaries``): nearly every review's summary is distinct, so a driver-side
count would grow with the reviews.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from recfound.data.chunks import in_order
from recfound.data.memory import release_unused
from recfound.data.split import Timeline, user_timelines

GENERIC_SUMMARY_ITEMS = 3
"""A summary written about this many different items ("Great product!") says nothing about any one of them."""
ITEM_REVIEWS = 5
"""Training reviews kept per item, earliest first: what a question-answering prompt quotes."""


def normal_summary(summary: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", summary.lower()).split())


NEXT_ITEMS = pa.schema([("earlier", pa.string()), ("later", pa.string())])


@dataclass
class Behaviour:
    quoted: frozenset[str] = frozenset()
    """The items whose training reviews a prompt quotes (questions without review snippets of their own): only
    theirs are kept, since every item's would grow with the reviews."""
    users: int = 0
    interactions: int = 0
    items: set[str] = field(default_factory=set)
    first_summaries: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Item -> (timestamp, summary) of its earliest training review with a summary (ties: the first user in order):
    the title of an item without metadata, never taken from a held-out review."""
    item_reviews: dict[str, list[tuple[int, str, int, str]]] = field(default_factory=dict)
    """Quoted item -> its earliest ``ITEM_REVIEWS`` training review texts as (timestamp, user, position, text)."""
    next_items: list[pa.Table] = field(default_factory=list, compare=False)
    """Consecutive training purchases of any user, (earlier, later) in ``NEXT_ITEMS`` tables of distinct pairs, one
    per gathered part (``next_item_pairs`` merges them): a Python object per pair would grow the driver with the
    reviews (about 200 bytes a pair, millions of pairs in a big dump, where Arrow holds about 30)."""
    _pairs: set[tuple[str, str]] = field(default_factory=set, compare=False, repr=False)
    """The pairs ``add`` met since the last ``seal``."""

    def add(self, user: str, timeline: Timeline) -> None:
        self.users += 1
        self.interactions += len(timeline)
        for position, (split, event) in enumerate(timeline):
            self.items.add(event.item)
            if split != "train":
                continue
            if event.summary and event.timestamp < self.first_summaries.get(event.item, (event.timestamp + 1, ""))[0]:
                self.first_summaries[event.item] = (event.timestamp, event.summary)
            if event.text and event.item in self.quoted:
                self._note_review(event.item, (event.timestamp, user, position, event.text))
        self._pairs.update(
            (a.item, b.item) for (s1, a), (s2, b) in zip(timeline, timeline[1:], strict=False) if s1 == s2 == "train"
        )

    def seal(self) -> None:
        """The pairs added so far into a table of ``next_items``."""
        if self._pairs:
            earlier, later = zip(*self._pairs, strict=True)  # in any order: next_item_pairs sorts
            self.next_items.append(pa.table([pa.array(earlier, pa.string()), pa.array(later, pa.string())], NEXT_ITEMS))
            self._pairs = set()

    def next_item_pairs(self) -> pa.Table:
        """Every distinct (earlier, later) pair, sorted. The merged table replaces the parts, each freed once coded
        (the parts and their copies were the driver's peak at 4M reviews): pairs are de-duplicated and sorted as
        int64 codes (``pair_codes``), not by an Arrow group-by and sort over their strings."""
        self.seal()
        ids = pa.array(sorted(self.items), pa.string())
        codes = [np.empty(0, np.int64)]
        while self.next_items:
            part = self.next_items.pop()
            codes.append(pair_codes(ids, part["earlier"], part["later"]))
        self.next_items = [pa.table(pair_ids(ids, np.unique(np.concatenate(codes))), NEXT_ITEMS)]
        return self.next_items[0]

    def _note_review(self, item: str, review: tuple[int, str, int, str]) -> None:
        kept = self.item_reviews.setdefault(item, [])
        if len(kept) < ITEM_REVIEWS or review < kept[-1]:
            kept.append(review)
            kept.sort()
            del kept[ITEM_REVIEWS:]

    def merge(self, later: Behaviour) -> None:
        """Add what ``later`` gathered from the users after this one's: the same facts as one pass over both."""
        self.users += later.users
        self.interactions += later.interactions
        self.items |= later.items
        for item, first in later.first_summaries.items():
            if first[0] < self.first_summaries.get(item, (first[0] + 1, ""))[0]:  # a tie keeps the earlier user's
                self.first_summaries[item] = first
        for item, reviews in later.item_reviews.items():
            self.item_reviews[item] = sorted(self.item_reviews.get(item, []) + reviews)[:ITEM_REVIEWS]
        self.seal()
        later.seal()
        self.next_items += later.next_items

    def reviews_of(self, item: str) -> list[str]:
        """Training review texts of ``item``, oldest first (at most ``ITEM_REVIEWS``)."""
        return [text for *_, text in self.item_reviews.get(item, [])]

    def summaries(self) -> dict[str, list[str]]:
        return {item: [summary] for item, (_, summary) in self.first_summaries.items()}


def pair_codes(ids: pa.Array, first: pa.ChunkedArray, second: pa.ChunkedArray) -> np.ndarray:
    """Each (first, second) pair as one int64, ``rank(first) * len(ids) + rank(second)`` with ranks in ``ids`` (sorted,
    holding every id of the pairs): the codes sort as the pairs of strings do, at 8 bytes a pair."""
    ranks = [pc.index_in(side, value_set=ids).to_numpy().astype(np.int64) for side in (first, second)]
    return ranks[0] * len(ids) + ranks[1]


def pair_ids(ids: pa.Array, codes: np.ndarray) -> list[pa.Array]:
    """The (first, second) id columns of ``pair_codes``' codes."""
    return [ids.take(codes // len(ids)), ids.take(codes % len(ids))]


def gather(timelines: Iterable[tuple[str, Timeline]], quoted: Iterable[str] = ()) -> Behaviour:
    behaviour = Behaviour(frozenset(quoted))
    for user, timeline in timelines:
        behaviour.add(user, timeline)
    behaviour.seal()
    return behaviour


@ray.remote
def _gather(chunk: pa.Table, quoted: frozenset[str]) -> Behaviour:
    behaviour = gather(user_timelines([chunk]), quoted)
    release_unused()  # as in user_rows._template: the chunk's timelines are freed
    return behaviour


def gathered(blocks: Iterable[pa.Table], quoted: Iterable[str] = ()) -> Behaviour:
    """``gather`` over the kept reviews' blocks, by Ray tasks on chunks of whole users, merged in user order."""
    items = frozenset(quoted)
    behaviour = Behaviour(items)
    for part in in_order(_gather, blocks, items):
        behaviour.merge(part)
    return behaviour


def _summary_keys(batch: pa.Table) -> pa.Table:
    return pa.table({"summary": [normal_summary(s) for s in batch["summary"].to_pylist()], "item": batch["item"]})


def _generic(group: pa.Table) -> pa.Table:
    generic = len(set(group["item"].to_pylist())) >= GENERIC_SUMMARY_ITEMS
    return group.slice(0, 1 if generic else 0).select(["summary"])


def generic_summaries(reviews: ray.data.Dataset) -> frozenset[str]:
    """Normalised summaries written about ``GENERIC_SUMMARY_ITEMS`` or more different items, counted by a Ray
    group-by over every review's (summary, item); only the generic ones come back."""
    keys = reviews.map_batches(_summary_keys, batch_format="pyarrow")
    rows = keys.groupby("summary").map_groups(_generic, batch_format="pyarrow").take_all()
    return frozenset(row["summary"] for row in rows)

"""What the task templates need from all users' timelines at once, gathered in one streaming pass over them.

Per-user rows (histories, options, reviews) are templated from one timeline at a time (``builder.py``); the few
facts that cross users are kept here, each bounded by the catalogue or by its distinct values rather than by the
reviews: an item's title of last resort, its earliest training reviews, which summaries are generic, and which
items follow each other in training histories.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from recfound.data.split import Timeline

GENERIC_SUMMARY_ITEMS = 3
"""A summary written about this many different items ("Great product!") says nothing about any one of them."""
ITEM_REVIEWS = 5
"""Training reviews kept per item, earliest first: what a question-answering prompt quotes."""


def normal_summary(summary: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", summary.lower()).split())


@dataclass
class Behaviour:
    users: int = 0
    interactions: int = 0
    items: set[str] = field(default_factory=set)
    first_summaries: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Item -> (timestamp, summary) of its earliest training review with a summary (ties: the first user in order):
    the title of an item without metadata, never taken from a held-out review."""
    item_reviews: dict[str, list[tuple[int, str, int, str]]] = field(default_factory=dict)
    """Item -> its earliest ``ITEM_REVIEWS`` training review texts as (timestamp, user, position, text)."""
    next_items: set[tuple[str, str]] = field(default_factory=set)
    """Consecutive training purchases (earlier, later) of any user."""
    _summary_items: dict[str, set[str] | None] = field(default_factory=dict)
    """Normalised summary -> the items it was written about; None once it is generic (the set is dropped)."""

    def add(self, user: str, timeline: Timeline) -> None:
        self.users += 1
        self.interactions += len(timeline)
        for position, (split, event) in enumerate(timeline):
            self.items.add(event.item)
            self._note_summary(event.summary, event.item)
            if split != "train":
                continue
            if event.summary and event.timestamp < self.first_summaries.get(event.item, (event.timestamp + 1, ""))[0]:
                self.first_summaries[event.item] = (event.timestamp, event.summary)
            if event.text:
                self._note_review(event.item, (event.timestamp, user, position, event.text))
        self.next_items.update(
            (a.item, b.item) for (s1, a), (s2, b) in zip(timeline, timeline[1:], strict=False) if s1 == s2 == "train"
        )

    def _note_summary(self, summary: str, item: str) -> None:
        key = normal_summary(summary)
        items = self._summary_items.setdefault(key, set())
        if items is not None:
            items.add(item)
            if len(items) >= GENERIC_SUMMARY_ITEMS:
                self._summary_items[key] = None

    def _note_review(self, item: str, review: tuple[int, str, int, str]) -> None:
        kept = self.item_reviews.setdefault(item, [])
        if len(kept) < ITEM_REVIEWS or review < kept[-1]:
            kept.append(review)
            kept.sort()
            del kept[ITEM_REVIEWS:]

    def generic_summaries(self) -> set[str]:
        return {summary for summary, items in self._summary_items.items() if items is None}

    def reviews_of(self, item: str) -> list[str]:
        """Training review texts of ``item``, oldest first (at most ``ITEM_REVIEWS``)."""
        return [text for *_, text in self.item_reviews.get(item, [])]

    def summaries(self) -> dict[str, list[str]]:
        return {item: [summary] for item, (_, summary) in self.first_summaries.items()}


def gather(timelines: Iterable[tuple[str, Timeline]]) -> Behaviour:
    behaviour = Behaviour()
    for user, timeline in timelines:
        behaviour.add(user, timeline)
    return behaviour

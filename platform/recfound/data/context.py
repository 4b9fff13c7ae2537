"""Everything a task builder reads: the catalogue, the split user timelines, judgements and the knobs."""

from __future__ import annotations

import random
from collections.abc import Sequence, Set
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from recfound.data.catalogue import CatalogueItem, NegativeSampler
from recfound.data.esci import QueryJudgement
from recfound.data.rows import Split
from recfound.data.split import Timeline, hash_split

if TYPE_CHECKING:  # qa.py builds tasks from a Context
    from recfound.data.qa import Question


@dataclass
class Context:
    seed: int
    catalogue: dict[str, CatalogueItem]
    timelines: dict[str, Timeline]
    judgements: Sequence[QueryJudgement] = ()
    questions: Sequence[Question] = ()
    source: str = "amazon_reviews"
    """Recorded in each row's ``source`` column (suffixed with the relation or text used where that varies)."""
    num_negatives: int = 1
    max_history: int = 20
    sr_options: int = 10
    holdout: float = 0.1
    sampler: NegativeSampler = field(init=False)
    _reviews: dict[str, list[str]] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.sampler = NegativeSampler(self.catalogue)

    def item_reviews(self, item: str) -> list[str]:
        """Training-split review texts of ``item``, oldest first: what a prompt may quote without leaking a held-out
        interaction."""
        if self._reviews is None:
            self._reviews = {}
            events = sorted(
                (e for t in self.timelines.values() for s, e in t if s == "train" and e.text),
                key=lambda e: (e.timestamp, e.user),
            )
            for event in events:
                self._reviews.setdefault(event.item, []).append(event.text)
        return self._reviews.get(item, [])

    def rng(self, *key: object) -> random.Random:
        """A generator per row key: rows do not depend on build order, caps or which other tasks ran."""
        return random.Random("\x00".join(map(str, (self.seed, *key))))

    def split(self, key: str) -> Split:
        return hash_split(self.seed, key, self.holdout)

    def negatives(self, rng: random.Random, positive: str, exclude: Set[str], k: int) -> list[str]:
        return self.sampler.sample(rng, self.catalogue[positive].category, exclude | {positive}, k)

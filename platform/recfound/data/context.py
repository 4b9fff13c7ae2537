"""Everything a task builder reads besides one user's timeline: the catalogue, what crosses users, judgements, knobs."""

from __future__ import annotations

import random
from collections.abc import Sequence, Set
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from recfound.data.behaviour import Behaviour
from recfound.data.catalogue import CatalogueItem, NegativeSampler
from recfound.data.esci import QueryJudgement
from recfound.data.rows import Split
from recfound.data.split import hash_split

if TYPE_CHECKING:  # qa.py builds tasks from a Context
    from recfound.data.qa import Question


@dataclass
class Context:
    seed: int
    catalogue: dict[str, CatalogueItem]
    behaviour: Behaviour = field(default_factory=Behaviour)
    judgements: Sequence[QueryJudgement] = ()
    questions: Sequence[Question] = ()
    source: str = "amazon_reviews"
    """Recorded in each row's ``source`` column (suffixed with the relation or text used where that varies)."""
    num_negatives: int = 1
    max_history: int = 20
    sr_options: int = 10
    holdout: float = 0.1
    pseudo_queries: bool = False
    """q2i is templated from review summaries, per user (no usable query log: ``q2i_mode``)."""
    generic_summaries: frozenset[str] = frozenset()
    """Normalised review summaries too generic to be a pseudo-query (``behaviour.generic_summaries``)."""
    sampler: NegativeSampler = field(init=False)

    def __post_init__(self) -> None:
        self.sampler = NegativeSampler(self.catalogue)

    def item_reviews(self, item: str) -> list[str]:
        """Earliest training-split review texts of ``item``: what a prompt may quote without leaking a held-out
        interaction."""
        return self.behaviour.reviews_of(item)

    def rng(self, *key: object) -> random.Random:
        """A generator per row key: rows do not depend on build order, caps or which other tasks ran."""
        return random.Random("\x00".join(map(str, (self.seed, *key))))

    def split(self, key: str) -> Split:
        return hash_split(self.seed, key, self.holdout)

    def negatives(self, rng: random.Random, positive: str, exclude: Set[str], k: int) -> list[str]:
        return self.sampler.sample(rng, self.catalogue[positive].category, exclude | {positive}, k)

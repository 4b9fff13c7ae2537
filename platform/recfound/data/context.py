"""Everything a task builder reads: the catalogue, the split user timelines, judgements and the knobs."""

from __future__ import annotations

import random
from collections.abc import Sequence, Set
from dataclasses import dataclass, field

from recfound.data.catalogue import CatalogueItem, NegativeSampler
from recfound.data.esci import QueryJudgement
from recfound.data.rows import Split
from recfound.data.split import Timeline, hash_split


@dataclass
class Context:
    seed: int
    catalogue: dict[str, CatalogueItem]
    timelines: dict[str, Timeline]
    judgements: Sequence[QueryJudgement] = ()
    source: str = "amazon_reviews"
    """Recorded in each row's ``source`` column (suffixed with the relation or text used where that varies)."""
    num_negatives: int = 1
    max_history: int = 20
    sr_options: int = 10
    holdout: float = 0.1
    sampler: NegativeSampler = field(init=False)

    def __post_init__(self) -> None:
        self.sampler = NegativeSampler(self.catalogue)

    def rng(self, *key: object) -> random.Random:
        """A generator per row key: rows do not depend on build order, caps or which other tasks ran."""
        return random.Random("\x00".join(map(str, (self.seed, *key))))

    def split(self, key: str) -> Split:
        return hash_split(self.seed, key, self.holdout)

    def negatives(self, rng: random.Random, positive: str, exclude: Set[str], k: int) -> list[str]:
        return self.sampler.sample(rng, self.catalogue[positive].category, exclude | {positive}, k)

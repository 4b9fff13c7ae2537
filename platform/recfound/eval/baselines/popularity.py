"""Popularity: every query gets the same ranking, most train interactions first; the floor any system must beat."""

from __future__ import annotations

import numpy as np
import pandas as pd

from recfound.eval.protocols import Scorer
from recfound.tasks import EMBEDDING_TASKS


class PopularityScorer(Scorer):
    def __init__(self, counts: np.ndarray) -> None:
        self.counts = counts

    def score(self, queries: np.ndarray) -> np.ndarray:
        return np.tile(self.counts, (len(queries), 1))

    def score_pool(self, queries: np.ndarray, pool: np.ndarray) -> np.ndarray:
        return self.counts[pool]


class Popularity:
    name = "popularity"
    tasks = frozenset(EMBEDDING_TASKS)

    def fit(self, items: pd.DataFrame, interactions: pd.DataFrame) -> None:
        """Count train-split interactions per item; valid/test interactions would leak the targets."""
        train = interactions.loc[interactions["split"] == "train", "item"]
        self.counts = train.value_counts().reindex(items["item_id"], fill_value=0).to_numpy(np.float64)

    def scorer(self, task: str, rows: pd.DataFrame) -> Scorer:
        return PopularityScorer(self.counts)

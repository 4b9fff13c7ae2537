"""Reference systems for the embedding tasks, evaluated by exactly the protocols that evaluate the model.

A baseline is fit once on the catalogue (items.parquet) and the interactions, then builds one ``Scorer`` per
task split; the scorer's query rows are the split's rows in order and its items are the fitted items in order:

    for baseline in (Popularity(), BM25(), ItemCF(), MiniLM()):
        baseline.fit(items, interactions)
        for task in sorted(baseline.tasks):
            rows = test_rows[task]
            scorer = baseline.scorer(task, rows)
            averaged(pool_values(scorer, items["item_id"], rows["pos_item"], rows["category"], items["category"], task))
"""

from __future__ import annotations

from typing import Protocol

import pandas as pd

from recfound.eval.baselines.bm25 import BM25
from recfound.eval.baselines.itemcf import ItemCF
from recfound.eval.baselines.minilm import MiniLM
from recfound.eval.baselines.popularity import Popularity
from recfound.eval.protocols import Scorer


class Baseline(Protocol):
    name: str
    tasks: frozenset[str]
    """The embedding tasks it can score; ``scorer`` raises for any other."""

    def fit(self, items: pd.DataFrame, interactions: pd.DataFrame) -> None: ...

    def scorer(self, task: str, rows: pd.DataFrame) -> Scorer: ...


__all__ = ["BM25", "Baseline", "ItemCF", "MiniLM", "Popularity"]

"""Item-to-item collaborative filtering from co-occurrence in users' train histories."""

from __future__ import annotations

import numpy as np
import pandas as pd

from recfound.eval.baselines.common import SparseRows, SparseScorer, resolve_query_items, user_histories
from recfound.eval.protocols import Scorer


class ItemCF:
    """sim(i, j) = users with both i and j / sqrt(users with i * users with j), over train interactions.

    U2I scores an item by its summed similarity to the user's history items; I2I by its similarity to the query
    item (found from the query text, see ``resolve_query_items``). Q2I has no item to start from: unsupported.
    A user with h train items adds h^2 pairs, so fitting is quadratic in history length.
    """

    name = "itemcf"
    tasks = frozenset({"u2i", "i2i"})

    def fit(self, items: pd.DataFrame, interactions: pd.DataFrame) -> None:
        self.items, self.interactions = items, interactions
        self.index = {item: i for i, item in enumerate(items["item_id"])}
        train = interactions[(interactions["split"] == "train") & interactions["item"].isin(self.index)]
        owned = train.assign(idx=train["item"].map(self.index))[["user", "idx"]].drop_duplicates()
        n = len(self.index)
        users = np.bincount(owned["idx"].to_numpy(np.int64), minlength=n)
        left, right = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        for _, group in owned.groupby("user")["idx"]:
            history = group.to_numpy(np.int64)
            left.append(np.repeat(history, history.size))
            right.append(np.tile(history, history.size))
        i, j = np.concatenate(left), np.concatenate(right)
        pairs, together = np.unique((i * n + j)[i != j], return_counts=True)
        i, j = pairs // n, pairs % n
        sim = together / np.sqrt(users[i].astype(np.float64) * users[j])
        self.similar = SparseRows.from_triples(i, j, sim, n, n)

    def scorer(self, task: str, rows: pd.DataFrame) -> Scorer:
        if task == "u2i":
            starts = user_histories(rows, self.interactions)
        elif task == "i2i":
            starts = [[q] if q else [] for q in resolve_query_items(rows, self.items)]
        else:
            raise ValueError(f"item-CF scores only {sorted(self.tasks)}, not {task!r}: it needs items to start from")
        cols = [sorted({self.index[item] for item in start if item in self.index}) for start in starts]
        return SparseScorer(SparseRows.from_lists(cols, [[1.0] * len(c) for c in cols], len(self.index)), self.similar)

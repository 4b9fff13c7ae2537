"""How often each item is a positive in the training data: the sampling probability behind in-batch negatives.

In-batch negatives are the other rows' positives, so an item turns up as a negative as often as it is bought:
plain InfoNCE then pushes popular items down, although popularity is exactly what a recommender should keep (on
a 5-core slice popularity alone beats the model). Subtracting log q(item) from each candidate's logit (Yi et al.
2019, "sampling-bias-corrected neural modeling") makes the in-batch softmax estimate the full softmax over the
catalogue. Counts are exact, from the training split, so every rank and every resumed run uses the same table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from recfound.tasks import task_path
from recfound.train.batches import item_keys


@dataclass(frozen=True)
class ItemPrior:
    """log q(item) by item key (``batches.item_keys``); an item never seen as a positive counts as seen once."""

    keys: np.ndarray
    """(N,) sorted int64 item keys."""
    log_q: np.ndarray
    """(N,) float32 log of each item's share of the training positives."""
    unseen: float
    """log q of an item with no training positive (one count)."""

    @classmethod
    def from_counts(cls, counts: dict[str, int]) -> ItemPrior:
        total = sum(counts.values()) + 1
        keys = item_keys(list(counts))
        order = np.argsort(keys)
        log_q = np.log(np.array(list(counts.values()), dtype=np.float64)[order] / total).astype(np.float32)
        return cls(keys[order], log_q, float(np.log(1 / total)))

    @classmethod
    def from_dataset(cls, data: str, tasks: list[str]) -> ItemPrior:
        """Positive counts over the train split of ``tasks`` (the embedding tasks a run trains)."""
        counts: dict[str, int] = {}
        for task in tasks:
            fs, path = url_to_fs(f"{data.rstrip('/')}/{task_path(task, 'train')}")
            items = pq.read_table(path, columns=["pos_item"], filesystem=fs).column("pos_item").to_pylist()
            for item in items:
                if item:
                    counts[item] = counts.get(item, 0) + 1
        return cls.from_counts(counts)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """log q of each key, any shape."""
        at = np.clip(np.searchsorted(self.keys, keys), 0, max(len(self.keys) - 1, 0))
        found = self.keys[at] == keys if len(self.keys) else np.zeros(keys.shape, dtype=bool)
        return np.where(found, self.log_q[at] if len(self.keys) else 0.0, self.unseen).astype(np.float32)

"""What the baselines share: catalogue texts, user histories, I2I query items, and a sparse linear scorer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recfound.eval.protocols import Scorer


def item_documents(items: pd.DataFrame) -> list[str]:
    """An item's searchable text: title plus text, the title once even when the text already repeats it."""
    return [
        text if title and title in text else f"{title} {text}".strip()
        for title, text in zip(items["title"].fillna("").astype(str), items["text"].fillna("").astype(str))
    ]


def user_histories(rows: pd.DataFrame, interactions: pd.DataFrame) -> list[list[str]]:
    """Per U2I row, the user's items from before the target's interaction, whatever their split.

    That is the history the row's query text describes (a test row's history holds the valid item). When the
    (user, target) interaction is missing, the user's train items stand in.
    """
    ordered = interactions.sort_values(["user", "timestamp"], kind="stable")
    users, times = ordered["user"].to_numpy(), ordered["timestamp"].to_numpy()
    items, train = ordered["item"].to_numpy(), (ordered["split"] == "train").to_numpy()
    keys, starts = np.unique(users, return_index=True)  # users are sorted, so each one's events are contiguous
    spans = dict(zip(keys, zip(starts, np.append(starts[1:], len(users)))))
    histories = []
    for user, target in zip(rows["user"], rows["pos_item"]):
        lo, hi = spans.get(user, (0, 0))
        hits = np.flatnonzero(items[lo:hi] == target)
        if hits.size:
            end = lo + np.searchsorted(times[lo:hi], times[lo + hits[-1]], side="left")
            histories.append(items[lo:end].tolist())
        else:
            histories.append(items[lo:hi][train[lo:hi]].tolist())
    return histories


def resolve_query_items(rows: pd.DataFrame, items: pd.DataFrame) -> list[str | None]:
    """The catalogue item each I2I query describes, or None.

    The row's ``query_item`` when it names one; otherwise (rows from published files, which carry no id) the
    query text matched to an item's text, then to a title, then its first line to a title: exact matches only.
    """
    by_text = dict(zip(items["text"], items["item_id"]))
    by_title = dict(zip(items["title"], items["item_id"]))
    named = rows["query_item"] if "query_item" in rows else pd.Series([""] * len(rows), index=rows.index)
    return [
        item or by_text.get(query) or by_title.get(query) or by_title.get(query.strip().split("\n", 1)[0].strip())
        for item, query in zip(named.fillna("").astype(str), rows["query"].astype(str))
    ]


@dataclass(frozen=True)
class SparseRows:
    """A sparse (rows x columns) matrix in CSR form: row r holds ``indices[indptr[r]:indptr[r+1]]``."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    n_cols: int

    @classmethod
    def from_triples(cls, rows: np.ndarray, cols: np.ndarray, data: np.ndarray, n_rows: int, n_cols: int) -> SparseRows:
        order = np.argsort(rows, kind="stable")
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_rows))])
        return cls(indptr, np.asarray(cols)[order], np.asarray(data, dtype=np.float64)[order], n_cols)

    @classmethod
    def from_lists(cls, cols: Sequence[Sequence[int]], data: Sequence[Sequence[float]], n_cols: int) -> SparseRows:
        lengths = np.array([len(c) for c in cols], dtype=np.int64)
        flat = np.fromiter((c for row in cols for c in row), dtype=np.int64, count=int(lengths.sum()))
        values = np.fromiter((v for row in data for v in row), dtype=np.float64, count=int(lengths.sum()))
        return cls(np.concatenate([[0], np.cumsum(lengths)]), flat, values, n_cols)

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(position in ``rows``, column, value) of every stored entry of the given rows."""
        starts, lengths = self.indptr[rows], self.indptr[rows + 1] - self.indptr[rows]
        flat = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        return np.repeat(np.arange(rows.size), lengths), self.indices[flat], self.data[flat]


class SparseScorer(Scorer):
    """Scores = queries @ features: query rows weight features (terms, history items); each feature row spreads
    its weights over items (item-CF: history items → similar items), as one vectorised sparse product."""

    def __init__(self, queries: SparseRows, features: SparseRows) -> None:
        self.queries, self.features = queries, features

    def score(self, queries: np.ndarray) -> np.ndarray:
        row, feature, weight = self.queries.take(np.asarray(queries))
        entry, item, value = self.features.take(feature)
        n_items = self.features.n_cols
        cells = row[entry] * n_items + item
        flat = np.bincount(cells, weights=weight[entry] * value, minlength=len(queries) * n_items)
        return flat.reshape(len(queries), n_items)

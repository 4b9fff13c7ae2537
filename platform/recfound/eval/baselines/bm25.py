"""Okapi BM25 over item text: the lexical baseline for every embedding task's query text, scored by ``bm25s``."""

from __future__ import annotations

import logging

import bm25s
import numpy as np
import pandas as pd

from recfound.eval.baselines.common import item_documents
from recfound.eval.metrics import words
from recfound.eval.protocols import Scorer
from recfound.tasks import EMBEDDING_TASKS

# bm25s sets its logger to DEBUG on import, so a per-fit debug line would reach any handler the process has.
logging.getLogger("bm25s").setLevel(logging.NOTSET)


class BM25:
    """bm25s's Lucene BM25: score(q, d) = sum over query tokens t (with repeats) of idf(t) tf / (tf + k1 (1 - b +
    b |d| / avgdl)), idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)), which stays positive for common terms.

    Tokens are ``metrics.words``' (lowercase alphanumeric runs, no stemming or stopwords), not bm25s's own tokenizer,
    which drops one-character tokens ("4", sizes such as "l"): BM25 and the text-overlap metrics read the same
    words. U2I queries are the user's history titles, so BM25 there is a content-based recommender.
    """

    name = "bm25"
    tasks = frozenset(EMBEDDING_TASKS)

    def __init__(self, k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b

    def fit(self, items: pd.DataFrame, interactions: pd.DataFrame) -> None:
        # float64: bm25s's default float32 would merge near-equal scores into ties the ranking then has to share.
        self.index = bm25s.BM25(k1=self.k1, b=self.b, method="lucene", dtype="float64")
        self.index.index([words(doc) for doc in item_documents(items)], show_progress=False)
        self.n_items = len(items)

    def scorer(self, task: str, rows: pd.DataFrame) -> Scorer:
        queries = [self.index.get_tokens_ids(words(q)) for q in rows["query"].astype(str)]
        return _BM25Scorer(self.index, queries, self.n_items)


class _BM25Scorer(Scorer):
    """One bm25s score vector per query row; the query's unknown tokens were already dropped."""

    def __init__(self, index: bm25s.BM25, queries: list[list[int]], n_items: int) -> None:
        self.index, self.queries, self.n_items = index, queries, n_items

    def score(self, queries: np.ndarray) -> np.ndarray:
        scores = [self.index.get_scores_from_ids(self.queries[q]) for q in queries]
        return np.array(scores, dtype=np.float64).reshape(len(scores), self.n_items)

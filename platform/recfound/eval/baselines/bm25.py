"""Okapi BM25 over item text: the lexical baseline for every embedding task's query text."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

from recfound.eval.baselines.common import SparseRows, SparseScorer, item_documents
from recfound.eval.metrics import tokenize
from recfound.eval.protocols import Scorer
from recfound.tasks import EMBEDDING_TASKS


class BM25:
    """score(q, d) = sum over query tokens t (with repeats) of idf(t) * tf (k1 + 1) / (tf + k1 (1 - b + b |d| / avgdl)).

    idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)), the Lucene form, which stays positive for common terms. U2I
    queries are the user's history titles, so BM25 there is a content-based recommender.
    """

    name = "bm25"
    tasks = frozenset(EMBEDDING_TASKS)

    def __init__(self, k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b

    def fit(self, items: pd.DataFrame, interactions: pd.DataFrame) -> None:
        docs = [Counter(tokenize(doc)) for doc in item_documents(items)]
        self.vocab: dict[str, int] = {}
        terms, item_of, tfs = [], [], []
        for i, doc in enumerate(docs):
            for term, tf in doc.items():
                terms.append(self.vocab.setdefault(term, len(self.vocab)))
                item_of.append(i)
                tfs.append(tf)
        terms_a, items_a, tf = np.array(terms, np.int64), np.array(item_of, np.int64), np.array(tfs, np.float64)
        lengths = np.array([sum(doc.values()) for doc in docs], np.float64)
        df = np.bincount(terms_a, minlength=len(self.vocab))
        idf = np.log1p((len(docs) - df + 0.5) / (df + 0.5))
        norm = self.k1 * (1 - self.b + self.b * lengths[items_a] / max(lengths.mean() if lengths.size else 0.0, 1e-12))
        weights = idf[terms_a] * tf * (self.k1 + 1) / (tf + norm)
        self.postings = SparseRows.from_triples(terms_a, items_a, weights, len(self.vocab), len(docs))

    def scorer(self, task: str, rows: pd.DataFrame) -> Scorer:
        counts = [Counter(t for t in tokenize(q) if t in self.vocab) for q in rows["query"].astype(str)]
        queries = SparseRows.from_lists(
            [[self.vocab[t] for t in c] for c in counts], [list(c.values()) for c in counts], len(self.vocab)
        )
        return SparseScorer(queries, self.postings)

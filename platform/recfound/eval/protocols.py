"""Ranking protocols: the paper's sampled pools and a ranking over the full catalogue (embedding tasks), and the
candidate lists of candidate_ranking (the pools' sampling, scored by ``eval/candidate_lists.py``).

Every system (the model, any baseline) enters as a ``Scorer`` over one task's query rows and one item list, so
one loop evaluates them all: dense vectors through ``DenseScorer``, anything else by implementing ``score``.
Queries are the rows 0..n-1 the scorer was built for; items are the positions in ``item_ids``. Ties and empty
queries follow the policy in ``recfound.eval.metrics``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import pandas as pd

from recfound.eval.metrics import mean_defined, mrr_from_ranks, ndcg_from_ranks, ranks_from_scores, recall_from_ranks

Positives = Sequence[str | Collection[str]]
"""Per query: one positive item id, or a collection of them (merged duplicate queries)."""


class Scorer(ABC):
    """Scores query rows against items; higher is a better match."""

    @abstractmethod
    def score(self, queries: np.ndarray) -> np.ndarray:
        """(len(queries), n_items) scores of the given query rows against every item."""

    def score_pool(self, queries: np.ndarray, pool: np.ndarray) -> np.ndarray:
        """(len(queries), P) scores against each query's own items; a scorer overrides it when that is cheaper."""
        return np.take_along_axis(self.score(queries), pool, axis=1)


class DenseScorer(Scorer):
    """Dot products of query and item vectors; cosine (the paper's ranking) unless ``cosine=False``."""

    def __init__(self, query_vecs: np.ndarray, item_vecs: np.ndarray, cosine: bool = True) -> None:
        self.queries = _unit(query_vecs) if cosine else np.asarray(query_vecs, dtype=np.float32)
        self.items = _unit(item_vecs) if cosine else np.asarray(item_vecs, dtype=np.float32)

    def score(self, queries: np.ndarray) -> np.ndarray:
        return self.queries[queries] @ self.items.T

    def score_pool(self, queries: np.ndarray, pool: np.ndarray) -> np.ndarray:
        # Gathers only the pool's vectors: a 20-item pool must not cost a pass over a 100k catalogue.
        return np.einsum("qd,qpd->qp", self.queries[queries], self.items[pool])


def _unit(vecs: np.ndarray) -> np.ndarray:
    vecs = np.asarray(vecs, dtype=np.float32)
    return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)


class RankMetric(str, Enum):
    MRR = "mrr"
    NDCG = "ndcg"


@dataclass(frozen=True)
class PoolProtocol:
    n_negatives: int
    metric: RankMetric
    k: int = 20


POOL_PROTOCOLS: dict[str, PoolProtocol] = {
    "u2i": PoolProtocol(19, RankMetric.MRR),
    "q2i": PoolProtocol(19, RankMetric.MRR),
    "i2i": PoolProtocol(5, RankMetric.NDCG),
}
"""The paper: U2I/Q2I rank 1 positive among 19 negatives by MRR@20; I2I ranks a query's positives plus 5
negatives by binary NDCG@20 (merge duplicate I2I queries with ``merge_duplicate_queries`` to pool several
positives; an unmerged row has one positive, so its NDCG@20 is 1 / log2(rank + 1) over a pool of 6)."""

LIST_PROTOCOLS: dict[str, PoolProtocol] = {"candidate_ranking": PoolProtocol(19, RankMetric.NDCG, 10)}
"""Generative tasks also ranked over candidate lists: per held-out purchase, the item bought + 19 sampled items
(the u2i pool's size), by NDCG@10 and AUC."""


LIST = "list"
"""Prefix of the list metrics every system has: ranked by its u2i scorer (a GRM's: its u2i embedding, as /v1/rank's
default ``scorer: embedding``)."""
LIST_GENERATIVE = "list_generative"
"""Prefix of the GRMs' list metrics ranked by the likelihood of "yes" (/v1/rank's ``scorer: generative``)."""


def list_metric_names(task: str, prefix: str = LIST) -> tuple[str, str]:
    """(headline, AUC) keys of a list-ranked task's metrics in results.json, for one scorer's ``prefix``."""
    protocol = LIST_PROTOCOLS[task]
    return f"{prefix}.{protocol.metric.value}@{protocol.k}", f"{prefix}.auc"


def _positive_indices(positives: Positives, item_ids: Sequence[str]) -> list[np.ndarray]:
    index = {item: i for i, item in enumerate(item_ids)}
    sets = [[p] if isinstance(p, str) else list(dict.fromkeys(p)) for p in positives]
    unknown = sorted({item for items in sets for item in items if item not in index})
    if unknown:
        raise KeyError(f"{len(unknown)} positive item ids are not in the item list, e.g. {unknown[:5]}")
    return [np.array([index[item] for item in items], dtype=np.int64) for items in sets]


def _draw(rng: np.random.Generator, population: np.ndarray, n: int, exclude: set[int]) -> list[int]:
    # Over-draw by the number of exclusions so the common case needs one call and stays O(n), not O(population).
    size = min(population.size, n + len(exclude))
    return [int(i) for i in rng.choice(population, size=size, replace=False) if i not in exclude][:n]


def sample_pools(
    positives: Positives,
    query_categories: Sequence[object],
    item_ids: Sequence[str],
    item_categories: Sequence[object],
    n_negatives: int,
    seed: int = 42,
    candidates: np.ndarray | None = None,
    exclude: Sequence[Collection[str]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's pool: its positives, then ``n_negatives`` negatives of the query's category.

    Negatives come from ``candidates`` (a boolean mask over items; default all), never from ``exclude[q]`` (item
    ids; a user's own purchases), same category first, topped up from any category when the category is too
    small; queries are drawn in order from one ``default_rng(seed)``, so pools are reproducible. Returns item
    indices (queries, P), padded with -1 when the candidates run out, and the matching relevance mask.
    """
    index = {item: i for i, item in enumerate(item_ids)}
    excluded = [{index[i] for i in items if i in index} for items in exclude or [()] * len(positives)]
    rng = np.random.default_rng(seed)
    allowed = np.flatnonzero(np.ones(len(item_ids), bool) if candidates is None else candidates)
    cats = pd.Series(np.asarray(item_categories, dtype=object)[allowed])
    by_category = {cat: allowed[idx] for cat, idx in cats.groupby(cats, sort=False).indices.items()}
    pools, n_pos = [], []
    for pos, cat, kept_out in zip(_positive_indices(positives, item_ids), query_categories, excluded, strict=True):
        taken = set(pos.tolist()) | kept_out
        negs = _draw(rng, by_category.get(cat, allowed[:0]), n_negatives, taken)
        if len(negs) < n_negatives:  # too few in the category (or none given): top up from any category
            negs += _draw(rng, allowed, n_negatives - len(negs), taken | set(negs))
        pools.append(np.concatenate([pos, negs]).astype(np.int64))
        n_pos.append(pos.size)
    width = max((p.size for p in pools), default=1)
    items = np.full((len(pools), width), -1, dtype=np.int64)
    relevant = np.zeros((len(pools), width), dtype=bool)
    for row, (pool, count) in enumerate(zip(pools, n_pos)):
        items[row, : pool.size] = pool
        relevant[row, :count] = True
    return items, relevant


PerQuery = dict[str, np.ndarray]
"""{metric: one value per query} (nan where undefined): what a protocol measures before averaging, kept so that two
systems can be compared query by query (``eval/significance.py``)."""


def averaged(values: PerQuery) -> dict[str, float]:
    """{metric: mean over the queries where it is defined, "queries": n}."""
    sizes = {len(v) for v in values.values()}
    return {name: mean_defined(v) for name, v in values.items()} | {"queries": sizes.pop() if sizes else 0}


def pool_values(
    scorer: Scorer,
    item_ids: Sequence[str],
    positives: Positives,
    query_categories: Sequence[object],
    item_categories: Sequence[object],
    task: str,
    *,
    seed: int = 42,
    candidates: np.ndarray | None = None,
    chunk: int = 256,
) -> PerQuery:
    """The paper's protocol for ``task`` (``POOL_PROTOCOLS``): {"mrr@20" or "ndcg@20": value per query}
    (``averaged`` gives the means)."""
    protocol = POOL_PROTOCOLS[task]
    items, relevant = sample_pools(
        positives, query_categories, item_ids, item_categories, protocol.n_negatives, seed, candidates
    )
    metric = mrr_from_ranks if protocol.metric is RankMetric.MRR else ndcg_from_ranks
    ranks = ranks_from_scores(pool_scores(scorer, items, chunk), relevant, valid=items >= 0)
    return {f"{protocol.metric.value}@{protocol.k}": metric(ranks, protocol.k)}


def pool_scores(scorer: Scorer, items: np.ndarray, chunk: int = 256) -> np.ndarray:
    """(queries, P) scores of each query's pool items (``sample_pools``' indices; -1 padding gets item 0's score,
    to be masked with ``items >= 0``), ``chunk`` queries at a time."""
    parts = [np.empty((0, items.shape[1]))]
    for start in range(0, len(items), chunk):
        queries = np.arange(start, min(start + chunk, len(items)))
        parts.append(scorer.score_pool(queries, np.maximum(items[queries], 0)))
    return np.concatenate(parts)


def full_catalogue_values(
    scorer: Scorer,
    item_ids: Sequence[str],
    positives: Positives,
    exclude: Sequence[Collection[str]] | None = None,
    *,
    chunk: int = 128,
) -> PerQuery:
    """Rank every item: Recall@10, Recall@50, NDCG@10 and uncut MRR per query (``averaged`` gives the means).

    ``exclude[q]`` holds item ids removed from query q's ranking (its training items); a query's own positives
    are never removed, and ids outside ``item_ids`` are ignored. ``chunk`` bounds memory at chunk x n_items.
    """
    index = {item: i for i, item in enumerate(item_ids)}
    pos = _positive_indices(positives, item_ids)
    results: dict[str, list[np.ndarray]] = {"recall@10": [], "recall@50": [], "ndcg@10": [], "mrr": []}
    for start in range(0, len(pos), chunk):
        queries = np.arange(start, min(start + chunk, len(pos)))
        relevant = np.zeros((queries.size, len(item_ids)), dtype=bool)
        valid = np.ones_like(relevant)
        for row, q in enumerate(queries):
            relevant[row, pos[q]] = True
            if exclude is not None:
                valid[row, [index[item] for item in exclude[q] if item in index]] = False
        ranks = ranks_from_scores(scorer.score(queries), relevant, valid)
        results["recall@10"].append(recall_from_ranks(ranks, 10))
        results["recall@50"].append(recall_from_ranks(ranks, 50))
        results["ndcg@10"].append(ndcg_from_ranks(ranks, 10))
        results["mrr"].append(mrr_from_ranks(ranks))
    return {name: np.concatenate([np.empty(0), *parts]) for name, parts in results.items()}


def training_exclusions(rows: pd.DataFrame, interactions: pd.DataFrame) -> list[set[str]]:
    """Per row, the row user's ``split == "train"`` items: what a full-catalogue U2I ranking leaves out."""
    train = interactions[interactions["split"] == "train"]
    by_user = train.groupby("user")["item"].agg(set).to_dict()
    return [set(by_user.get(user, ())) for user in rows["user"]]


def merge_duplicate_queries(rows: pd.DataFrame) -> tuple[pd.DataFrame, list[list[str]]]:
    """One row per distinct query text, with every positive of its duplicates (the paper's multi-positive I2I)."""
    groups = rows.groupby("query", sort=False)["pos_item"]
    positives = [list(dict.fromkeys(items)) for items in groups.agg(list)]
    return rows.loc[groups.head(1).index].reset_index(drop=True), positives


def task_candidates(item_ids: Sequence[str], *frames: pd.DataFrame) -> np.ndarray:
    """Mask of items that occur in these task rows (as positives or hard negatives): the paper's "same task"."""
    seen: set[str] = set()
    for frame in frames:
        seen.update(frame["pos_item"])
        seen.update(item for items in frame["neg_items"] for item in items)
    return np.fromiter((item in seen for item in item_ids), dtype=bool, count=len(item_ids))

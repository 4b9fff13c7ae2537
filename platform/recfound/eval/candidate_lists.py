"""The candidate-list protocol of candidate_ranking: per held-out purchase, the item bought and 19 items the user
never bought, each scored on its own and ranked per list (NDCG@10, AUC).

candidate_ranking's rows ask one yes/no question each, and a yes/no F1 does not say whether the item bought is
placed above the others, which is what a recommender is for. Lists do, and every system can rank the same ones,
each as /v1/rank would: ``list.*`` by the system's u2i scorer of the list's user (a GRM's: its u2i embedding of the
history against each candidate's, /v1/rank's default ``scorer: embedding``), and for the GRMs also
``list_generative.*``, by how much likelier "yes" is than "no" (``scorer: generative``, M6-Rec's likelihood
scoring; the untrained backbone doing it is the zero-shot result).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recfound.data.templates import NO, YES, ranking_input, served_instructions, with_candidate
from recfound.eval.baselines import Baseline
from recfound.eval.metrics import auc_from_ranks, mean_defined, ndcg_from_ranks, ranks_from_scores
from recfound.eval.protocols import (
    LIST,
    LIST_GENERATIVE,
    LIST_PROTOCOLS,
    PerQuery,
    list_metric_names,
    pool_scores,
    sample_pools,
)
from recfound.eval.systems import GRMSystem


@dataclass(frozen=True)
class CandidateLists:
    """One task's lists, sampled once and ranked by every system."""

    task: str
    rows: pd.DataFrame
    """One row per list, from a "yes" row of the split: id, user, pos_item, prompt, and query (the prompt's
    history: the u2i query text the baselines read)."""
    items: np.ndarray
    """(lists, 1 + negatives) catalogue positions, the item bought first, -1 where the catalogue ran out."""
    relevant: np.ndarray
    titles: np.ndarray
    """Catalogue titles by position: the product a candidate's prompt names."""


def build_lists(
    task: str, rows: pd.DataFrame, items: pd.DataFrame, interactions: pd.DataFrame, n_lists: int, seed: int, where: str
) -> CandidateLists:
    """A seeded sample of ``n_lists`` "yes" rows of ``rows`` (the split's), each with the protocol's negatives
    drawn by ``sample_pools`` (seeded, the bought item's category first) from the catalogue minus every item the
    user bought in any split: an earlier or later purchase is no negative. ``where`` names the rows' file in
    errors."""
    positives = rows[rows["response"] == YES]
    if n_lists < len(positives):
        positives = positives.sample(n=n_lists, random_state=seed).sort_index()
    histories = []
    for row_id, prompt in zip(positives["id"], positives["prompt"], strict=True):
        try:
            histories.append(ranking_input(prompt)["history"])
        except ValueError as err:
            raise ValueError(f"{where} row id {row_id}: {err}") from None
    category = dict(zip(items["item_id"], items["category"], strict=True))
    owned = interactions.groupby("user")["item"].agg(set).to_dict()
    frame = pd.DataFrame(
        {
            "id": positives["id"].to_numpy(),
            "user": positives["user"].to_numpy(),
            "pos_item": positives["item"].to_numpy(),
            "prompt": positives["prompt"].to_numpy(),
            "query": histories,
            "category": [category.get(item) for item in positives["item"]],
        }
    )
    grid, relevant = sample_pools(
        frame["pos_item"].tolist(),
        frame["category"].tolist(),
        items["item_id"].tolist(),
        items["category"].tolist(),
        LIST_PROTOCOLS[task].n_negatives,
        seed,
        exclude=[owned.get(user, set()) for user in frame["user"]],
    )
    return CandidateLists(task, frame, grid, relevant, items["title"].fillna("").to_numpy(dtype=object))


def yes_scores(system: GRMSystem, lists: CandidateLists) -> np.ndarray:
    """Per candidate, the mean per-token log-likelihood of "yes" minus that of "no" (the scores the closed-answer
    yes/no decision compares, so a candidate ranks above 0 exactly when the model would answer yes). Its prompt is
    the list's prompt naming the candidate instead: same instruction and history for every candidate."""
    cells = np.argwhere(lists.items >= 0)
    prompts = [with_candidate(lists.rows["prompt"].iat[r], lists.titles[lists.items[r, c]]) for r, c in cells]
    both = system.choice_scores(lists.task, prompts, (YES, NO))
    scores = np.zeros(lists.items.shape)
    scores[cells[:, 0], cells[:, 1]] = both[:, 0] - both[:, 1]
    return scores


def embedding_scores(system: Baseline, lists: CandidateLists) -> np.ndarray:
    """Per candidate, the system's u2i score for the list's user: a GRM's is the cosine of its u2i embedding of the
    history, under the u2i instructions serving uses, to the candidate's item embedding."""
    served = served_instructions("u2i")
    rows = lists.rows.assign(query_instruction=served["query"], pos_instruction=served["item"])
    return pool_scores(system.scorer("u2i", rows), lists.items)


def list_scores(system: Baseline, lists: CandidateLists) -> dict[str, np.ndarray]:
    """{metric prefix: (lists, candidates) scores} of the scorers the system has (none: it cannot rank a user's
    candidates)."""
    scores = {LIST: embedding_scores(system, lists)} if "u2i" in system.tasks else {}
    if isinstance(system, GRMSystem):
        scores[LIST_GENERATIVE] = yes_scores(system, lists)
    return scores


def list_metrics(scores: np.ndarray, lists: CandidateLists, prefix: str = LIST) -> dict[str, float]:
    """Mean NDCG@k and mean per-list AUC, ties at their expected rank (the module policy of eval/metrics.py)."""
    return {name: mean_defined(values) for name, values in list_values(scores, lists, prefix).items()}


def list_values(scores: np.ndarray, lists: CandidateLists, prefix: str = LIST) -> PerQuery:
    """NDCG@k and AUC per list, under ``prefix``'s metric names."""
    valid = lists.items >= 0
    ranks = ranks_from_scores(scores, lists.relevant, valid)
    ndcg, auc = list_metric_names(lists.task, prefix)
    return {
        ndcg: ndcg_from_ranks(ranks, LIST_PROTOCOLS[lists.task].k),
        auc: auc_from_ranks(ranks, (valid & ~lists.relevant).sum(axis=1)),
    }


def system_list_values(system: Baseline, lists: Sequence[CandidateLists]) -> dict[str, PerQuery]:
    """{task: per-list metrics} of the candidate lists the system can rank."""
    out: dict[str, PerQuery] = {}
    for ranked in lists:
        for prefix, scores in list_scores(system, ranked).items():
            out[ranked.task] = out.get(ranked.task, {}) | list_values(scores, ranked, prefix)
    return out

"""candidate_ranking's list protocol on a hand-made shop: list construction, the GRM's P(yes) scores, the
baselines' scores and the metrics."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from recfound.data.templates import INSTRUCTIONS, alpaca, candidate_text, history_text, with_candidate
from recfound.eval.baselines import BM25, ItemCF, Popularity
from recfound.eval.candidate_lists import CandidateLists, build_lists, list_metrics, list_scores, system_list_values
from recfound.eval.metrics import mean_defined
from recfound.eval.systems import GRMSystem
from recfound.model.backbone import BackboneConfig
from recfound.model.formats import Side
from recfound.model.grm import GRM
from recfound.serving.index import instructions_from_templates

TASK = "candidate_ranking"
ITEMS = pd.DataFrame(
    {
        "item_id": [f"i{i}" for i in range(40)],
        "title": [f"magazine number {i}" for i in range(40)],
        "text": [f"Title: magazine number {i}" for i in range(40)],
        "category": ["a"] * 30 + ["b"] * 10,
        "brand": [""] * 40,
    }
)
BOUGHT = {"u1": ["i0", "i1", "i2", "i3"], "u2": ["i0", "i4", "i1", "i5"], "u3": ["i4", "i0", "i6", "i30"]}
INTERACTIONS = pd.DataFrame(
    [
        {"user": u, "item": item, "timestamp": t, "rating": 5.0, "split": ("train", "train", "valid", "test")[t]}
        for u, items in BOUGHT.items()
        for t, item in enumerate(items)
    ]
)


def _row(row_id: int, user: str, item: str, answer: str) -> dict:
    history = history_text([f"magazine number {i[1:]}" for i in BOUGHT[user][:3]])
    prompt = alpaca(INSTRUCTIONS[TASK][row_id % 3], candidate_text(history, f"magazine number {item[1:]}"))
    return {"id": row_id, "task": TASK, "prompt": prompt, "response": answer, "user": user, "item": item}


ROWS = pd.DataFrame(
    [
        _row(0, "u1", "i3", "yes"),
        _row(1, "u1", "i20", "no"),
        _row(2, "u2", "i5", "yes"),
        _row(3, "u2", "i21", "no"),
        _row(4, "u3", "i30", "yes"),
        _row(5, "u3", "i7", "no"),
    ]
)


def _lists(n_lists: int = 10, seed: int = 42, rows: pd.DataFrame = ROWS) -> CandidateLists:
    return build_lists(TASK, rows, ITEMS, INTERACTIONS, n_lists, seed, "data/tasks/candidate_ranking/test.parquet")


def test_a_list_per_yes_row_the_item_bought_then_19_seeded_items_the_user_never_bought() -> None:
    lists = _lists()
    assert lists.rows["id"].tolist() == [0, 2, 4] and lists.items.shape == (3, 20)
    assert lists.relevant[:, 0].all() and not lists.relevant[:, 1:].any()
    for row, user in enumerate(["u1", "u2", "u3"]):
        names = ITEMS["item_id"].to_numpy()[lists.items[row]]
        assert names[0] == BOUGHT[user][-1] and not set(names[1:]) & set(BOUGHT[user]) and len(set(names)) == 20
    assert ITEMS["category"][lists.items[2]].tolist() == ["b"] * 10 + ["a"] * 10  # the bought item's category first
    assert lists.rows["query"][0] == "1. magazine number 0\n2. magazine number 1\n3. magazine number 2"
    again, other = _lists(), _lists(seed=7)
    assert (again.items == lists.items).all() and not (other.items == lists.items).all()
    sample = _lists(n_lists=2)
    assert len(sample.rows) == 2 and set(sample.rows["id"]) <= {0, 2, 4}


def test_a_row_that_is_no_ranking_prompt_names_its_file_and_row() -> None:
    broken = ROWS.assign(prompt=ROWS["prompt"].where(ROWS["id"] != 2, "### Instruction:\nhi\n\n### Response:"))
    with pytest.raises(ValueError, match=r"data/tasks/candidate_ranking/test.parquet row id 2: not a candidate_rank"):
        _lists(rows=broken)


def test_list_metrics_by_hand() -> None:
    # list 0: the bought item (0.5) under 0.9, tied with one 0.5 -> expected rank 2.5, AUC (1 + 0.5) / 3;
    # list 1: first -> NDCG 1, AUC 1; list 2 is one item short (-1 padding): ranked over 3 items, AUC 2 / 2
    items = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, -1]])
    relevant = np.zeros_like(items, dtype=bool)
    relevant[:, 0] = True
    lists = CandidateLists(TASK, pd.DataFrame(), items, relevant, np.array([]))
    scores = np.array([[0.5, 0.9, 0.5, 0.1], [0.9, 0.1, 0.2, 0.3], [0.4, 0.1, 0.2, 99.0]])
    metrics = list_metrics(scores, lists)
    assert metrics["list.auc"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert metrics["list.ndcg@10"] == pytest.approx((1 / math.log2(3.5) + 1 + 1) / 3)


def test_the_grm_ranks_by_its_u2i_embedding_as_rank_does_by_default(one_thread: None) -> None:
    """``list.*``: the cosine of the user's u2i embedding (the list's history, serving's u2i instructions) to each
    candidate's item embedding, what /v1/rank's default ``scorer: embedding`` returns; the yes/no likelihood is
    kept apart under ``list_generative.*``."""
    torch.manual_seed(0)
    system = GRMSystem("backbone", GRM.build(BackboneConfig()).eval(), batch_size=8)
    system.fit(ITEMS, INTERACTIONS)
    lists = _lists(n_lists=2)
    scores = list_scores(system, lists)
    assert set(scores) == {"list", "list_generative"} and scores["list"].shape == (2, 20)
    instructions = instructions_from_templates()["u2i"]
    users = system.embed("u2i", [instructions["query"]] * 2, lists.rows["query"].tolist(), Side.QUERY)
    items = system.embed("u2i", [instructions["item"]] * 40, ITEMS["text"].tolist(), Side.ITEM)
    expected = np.einsum("ld,lcd->lc", users, items[lists.items])
    assert np.allclose(scores["list"], expected, atol=1e-5) and len(set(scores["list"][0].tolist())) > 1
    values = system_list_values(system, [lists])[TASK]
    assert set(values) == {"list.auc", "list.ndcg@10", "list_generative.auc", "list_generative.ndcg@10"}
    assert {k: mean_defined(v) for k, v in values.items() if k.startswith("list.")} == list_metrics(expected, lists)


def test_the_grm_scores_each_candidate_by_yes_minus_no_on_the_prompt_naming_it(one_thread: None) -> None:
    torch.manual_seed(0)
    system = GRMSystem("backbone", GRM.build(BackboneConfig()).eval(), batch_size=8)
    system.fit(ITEMS, INTERACTIONS)
    lists = _lists(n_lists=1)
    scores = list_scores(system, lists)["list_generative"]
    assert scores.shape == (1, 20) and len(set(scores[0].tolist())) > 1
    prompt = lists.rows["prompt"][0]
    for col in (0, 7):
        title = ITEMS["title"][lists.items[0, col]]
        asked = with_candidate(prompt, title)
        assert (asked == prompt) == (col == 0) and f"Candidate product: {title}\n" in asked
        yes, no = system.model.choice_scores([asked], ["yes", "no"], TASK)[0].tolist()
        assert scores[0, col] == pytest.approx(yes - no, abs=1e-5)


def test_baselines_rank_the_same_lists_with_their_u2i_scores() -> None:
    lists = _lists()
    popularity = Popularity()
    popularity.fit(ITEMS, INTERACTIONS)
    train = INTERACTIONS[INTERACTIONS["split"] == "train"]["item"].value_counts()
    expected = [[train.get(ITEMS["item_id"][i], 0) for i in row] for row in lists.items]
    assert list(list_scores(popularity, lists)) == ["list"]
    assert list_scores(popularity, lists)["list"].tolist() == expected
    item_cf = ItemCF()
    item_cf.fit(ITEMS, INTERACTIONS)
    values = system_list_values(item_cf, [lists])
    assert set(values) == {TASK} and set(values[TASK]) == {"list.auc", "list.ndcg@10"}
    per_list = values[TASK]  # one value per list
    assert {len(v) for v in per_list.values()} == {len(lists.items)}
    assert {k: mean_defined(v) for k, v in per_list.items()} == list_metrics(list_scores(item_cf, lists)["list"], lists)
    no_u2i = BM25()
    no_u2i.tasks = frozenset({"q2i"})
    assert list_scores(no_u2i, lists) == {} and system_list_values(no_u2i, [lists]) == {}

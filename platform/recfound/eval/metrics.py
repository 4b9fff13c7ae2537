"""Evaluation metrics: ranking metrics over expected ranks, and the generative metrics of the paper's table.

Ranking. A query's positives are described by their 1-based ranks, one row per query, padded with nan.
Tie policy ("expected rank"): a positive's rank is 1 + (items scored strictly higher) + (other positives tied
with it that come before it in item order) + half of the negatives tied with it. For a single positive this is
exactly its expected rank under a uniform random tie-break; tied positives are ordered by input order because
with binary relevance their mutual order is immaterial. Metrics are then read at that rank, so a scorer that
gives every item the same score earns chance-level rank (n + 1) / 2 rather than rank 1, and a positive at
expected rank 10.5 misses a top-10 cutoff. MRR at rank r is 1 / E[r], not E[1 / r]. Where no positive ties a
negative, MRR@k, NDCG@k and Recall@k equal trec_eval's (pytrec_eval, tested); where one does, trec_eval orders
the tie by document id, so its value depends on the ids, while ours is the expected rank (trec_eval's value when
the id happens to put the positive mid-tie).

Empty rule: a query without positives has no defined metric and scores nan; averages skip nan queries and are
nan when no query is defined. The same holds for generative metrics over empty inputs.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache, partial

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer, tokenizers

from recfound.data.templates import RELATIONS, SENTIMENTS

_TOKEN = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    """Lowercase alphanumeric runs: the tokeniser behind BM25, token F1 and the label parsers (ROUGE-L uses
    rouge-score's, which splits the same way on ASCII text)."""
    return _TOKEN.findall(text.lower())


def _check_k(k: int | None) -> None:
    if k is not None and k < 1:
        raise ValueError(f"cutoff k must be >= 1, got {k}")


def mean_defined(values: np.ndarray) -> float:
    """Mean over defined (non-nan) per-query values; nan when none is defined."""
    values = np.asarray(values, dtype=np.float64)
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


def ranks_from_scores(scores: np.ndarray, relevant: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Expected ranks (module tie policy) of each row's relevant items, shape (rows, max positives), nan padded.

    ``valid`` masks out items that take no part in the ranking (excluded or padding); relevant items always do,
    so an exclusion list can never hide the target.
    """
    scores = np.asarray(scores)
    relevant = np.asarray(relevant, dtype=bool)
    valid = relevant | (np.ones_like(relevant) if valid is None else np.asarray(valid, dtype=bool))
    if np.isnan(scores[valid]).any():
        raise ValueError("scores contain nan: a nan can neither win nor lose, so the ranking is undefined")
    rows, cols = np.nonzero(relevant)
    target = scores[rows, cols][:, None]
    block, ok, rel = scores[rows], valid[rows], relevant[rows]
    higher = ((block > target) & ok).sum(axis=1)
    tied = (block == target) & ok
    tied_neg = (tied & ~rel).sum(axis=1)
    tied_pos_before = (tied & rel & (np.arange(scores.shape[1]) < cols[:, None])).sum(axis=1)
    counts = relevant.sum(axis=1)
    slot = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    ranks = np.full((scores.shape[0], max(int(counts.max(initial=0)), 1)), np.nan)
    ranks[rows, slot] = 1 + higher + tied_pos_before + tied_neg / 2
    return ranks


def _no_positives(ranks: np.ndarray) -> np.ndarray:
    return np.isnan(ranks).all(axis=1)


def mrr_from_ranks(ranks: np.ndarray, k: int | None = None) -> np.ndarray:
    """Per-query reciprocal rank of the best positive, 0 beyond cutoff ``k`` (None: no cutoff)."""
    _check_k(k)
    best = np.where(np.isnan(ranks), np.inf, ranks).min(axis=1)
    rr = np.where(best <= (np.inf if k is None else k), 1.0 / best, 0.0)
    return np.where(_no_positives(ranks), np.nan, rr)


def recall_from_ranks(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-query share of the positives ranked within the top ``k``."""
    _check_k(k)
    hits = (ranks <= k).sum(axis=1)
    n_pos = (~np.isnan(ranks)).sum(axis=1)
    return np.where(n_pos > 0, hits / np.maximum(n_pos, 1), np.nan)


def ndcg_from_ranks(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-query binary-relevance NDCG@k; the ideal DCG places all of the query's positives first."""
    _check_k(k)
    gains = np.where(ranks <= k, 1.0 / np.log2(np.where(np.isnan(ranks), 1.0, ranks) + 1), 0.0).sum(axis=1)
    n_pos = (~np.isnan(ranks)).sum(axis=1)
    ideal_prefix = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))])
    ideal = ideal_prefix[np.minimum(n_pos, k)]
    return np.where(n_pos > 0, gains / np.maximum(ideal, 1e-12), np.nan)


def auc_from_ranks(ranks: np.ndarray, n_negatives: np.ndarray) -> np.ndarray:
    """Per-query ROC AUC: the share of (positive, negative) pairs the positive wins, a tie counting half (the
    Mann-Whitney statistic), read off expected ranks. The i-th best positive (0-based) has i positives above it,
    so ``rank - 1 - i`` negatives above it in expectation. nan without a positive or a negative."""
    ordered = np.sort(ranks, axis=1)  # nan (padding) sorts last
    above = np.nansum(ordered - 1 - np.arange(ranks.shape[1]), axis=1)
    n_pos = (~np.isnan(ranks)).sum(axis=1)
    pairs = n_pos * np.asarray(n_negatives)
    return np.where(pairs > 0, 1 - above / np.maximum(pairs, 1), np.nan)


def _ranks_of(ranked_relevance: Sequence[int | bool]) -> np.ndarray:
    ranks = np.flatnonzero(np.asarray(ranked_relevance, dtype=float) > 0) + 1.0
    return ranks[None, :] if ranks.size else np.full((1, 1), np.nan)


def mrr_at_k(ranked_relevance: Sequence[int | bool], k: int) -> float:
    """MRR@k of one already-ordered list of binary relevance labels; nan when it holds no positive."""
    return float(mrr_from_ranks(_ranks_of(ranked_relevance), k)[0])


def ndcg_at_k(ranked_relevance: Sequence[int | bool], k: int) -> float:
    """Binary NDCG@k of one ordered list; the ideal counts every positive in the list, even those past k."""
    return float(ndcg_from_ranks(_ranks_of(ranked_relevance), k)[0])


def recall_at_k(ranked_relevance: Sequence[int | bool], k: int) -> float:
    """Recall@k of one ordered list: positives in the top k over all positives in the list."""
    return float(recall_from_ranks(_ranks_of(ranked_relevance), k)[0])


# ---- generative metrics: predictions and references are lists of strings; each returns the corpus score ----

_OPTION = re.compile(
    r"[\(\[]\s*([A-Za-z])\s*[\)\]]"  # (b) [B]
    r"|(?i:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*([A-Za-z])(?![A-Za-z0-9])"  # answer: b / option C
    r"|(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9'’])"  # a bare capital: B, B. title, B)
    r"|(?<![A-Za-z0-9])([a-z])(?=[.):]|\s*$)"  # lowercase only as b. b) b: or alone, never the article "a"
)


def parse_option(text: str) -> str | None:
    """First option letter in ``text``, upper-cased; None when there is none.

    Bare capitals count ("I think B" reads as I), lowercase letters only when marked as an option, so
    "a red dress" is not option A.
    """
    match = _OPTION.search(text)
    return next(g for g in match.groups() if g).upper() if match else None


def _check_pairs(preds: Sequence[str], golds: Sequence[str]) -> bool:
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} references")
    return len(preds) > 0


def option_accuracy(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Recall@1 of the option letter: both sides parsed with ``parse_option``; unparsable predictions miss."""
    if not _check_pairs(preds, golds):
        return float("nan")
    hits = [(p := parse_option(pred)) is not None and p == parse_option(gold) for pred, gold in zip(preds, golds)]
    return float(np.mean(hits))


def _normalize(text: str) -> str:
    return " ".join(words(text))


def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """The label whose words occur earliest in ``text`` (longest wins a tie: "very positive" over "positive")."""
    norm = f" {_normalize(text)} "
    found = [
        (pos, -len(lab), lab) for lab in labels if _normalize(lab) and (pos := norm.find(f" {_normalize(lab)} ")) >= 0
    ]
    return min(found)[2] if found else None


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")


def macro_f1(preds: Sequence[str], golds: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """Unweighted mean F1 over the classes that occur among golds or parsed predictions.

    ``labels`` defaults to the distinct golds. A prediction naming no label is wrong (a miss for its gold's
    class) without forming a class of its own; classes absent from both sides are skipped, not scored 0.
    """
    if not _check_pairs(preds, golds):
        return float("nan")
    labels = list(dict.fromkeys(labels if labels is not None else (_normalize(g) for g in golds)))
    parsed_golds = [parse_label(g, labels) for g in golds]
    parsed_preds = [parse_label(p, labels) for p in preds]
    scores = []
    for label in labels:
        tp = sum(p == g == label for p, g in zip(parsed_preds, parsed_golds))
        fp = sum(p == label != g for p, g in zip(parsed_preds, parsed_golds))
        fn = sum(g == label != p for p, g in zip(parsed_preds, parsed_golds))
        if tp + fp + fn:
            scores.append(_f1(tp, fp, fn))
    return float(np.mean(scores)) if scores else float("nan")


def binary_f1(preds: Sequence[str], golds: Sequence[str], positive: str = "yes") -> float:
    """F1 of the positive class; a text is positive when its first word is ``positive`` ("Yes, they match")."""
    if not _check_pairs(preds, golds):
        return float("nan")
    said = [words(text)[:1] == [positive.lower()] for text in preds]
    truth = [words(text)[:1] == [positive.lower()] for text in golds]
    tp = sum(p and g for p, g in zip(said, truth))
    fp = sum(p and not g for p, g in zip(said, truth))
    fn = sum(g and not p for p, g in zip(said, truth))
    return _f1(tp, fp, fn)


def parse_attributes(text: str) -> set[tuple[str, str]]:
    """(attribute, value) pairs, normalised, from a JSON object or "attr: value" text.

    Text pairs are separated by ";", "," or newlines; a piece without a colon is another value of the previous
    attribute ("material: cotton, polyester"), or of attribute "" when none came before (a bare value list).
    """
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        values = ((k, v) for k, vs in obj.items() for v in (vs if isinstance(vs, list) else [vs]))
        return {(_normalize(str(k)), _normalize(str(v))) for k, v in values if _normalize(str(v))}
    pairs, key = set(), ""
    for piece in re.split(r"[;,\n]", text):
        if ":" in piece:
            key, piece = (_normalize(part) for part in piece.split(":", 1))
        if value := _normalize(piece):
            pairs.add((key, value))
    return pairs


def attribute_f1(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Micro F1 of exact (attribute, value) matches, summed over the corpus (see ``parse_attributes``)."""
    if not _check_pairs(preds, golds):
        return float("nan")
    tp = fp = fn = 0
    for pred, gold in zip(preds, golds):
        p, g = parse_attributes(pred), parse_attributes(gold)
        tp, fp, fn = tp + len(p & g), fp + len(p - g), fn + len(g - p)
    return _f1(tp, fp, fn)


def _overlap_f1(matched: int, n_pred: int, n_ref: int) -> float:
    if not n_pred or not n_ref:
        return float(n_pred == n_ref)  # both empty agree perfectly; one empty shares nothing
    return 2 * matched / (n_pred + n_ref)


def token_f1(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean SQuAD-style bag-of-tokens F1: an offline stand-in for BERTScore on free text."""
    if not _check_pairs(preds, refs):
        return float("nan")
    scores = []
    for pred, ref in zip(preds, refs):
        p, r = words(pred), words(ref)
        scores.append(_overlap_f1(sum((Counter(p) & Counter(r)).values()), len(p), len(r)))
    return float(np.mean(scores))


# The tokenizer passed explicitly: left to default, RougeScorer logs through absl, whose first log installs a
# root stderr handler (logging.basicConfig) in whatever process imports this module.
_ROUGE_L = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizers.DefaultTokenizer(use_stemmer=False))


def rouge_l(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean ROUGE-L F1 by ``rouge-score`` (Lin's tokenisation, no stemming): the free-text fallback, since
    BERTScore's roberta-large scorer is not available offline. A pair with an empty side scores 0, even when both
    are empty (rouge-score's rule; ``token_f1`` counts two empty texts as agreeing)."""
    if not _check_pairs(preds, refs):
        return float("nan")
    return float(np.mean([_rouge_l_pair(pred, ref) for pred, ref in zip(preds, refs)]))


@lru_cache(maxsize=1 << 16)
def _rouge_l_pair(pred: str, ref: str) -> float:
    # Cached: a bootstrap (eval/significance.py) scores the same pairs thousands of times.
    return _ROUGE_L.score(ref, pred)["rougeL"].fmeasure


def bleu4(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU-4 by ``sacrebleu`` (its 13a tokenisation, one reference per row), on a 0-1 scale like every
    other metric here (P5 and sacrebleu print it x100)."""
    if not _check_pairs(preds, refs):
        return float("nan")
    return sacrebleu.corpus_bleu(list(preds), [list(refs)]).score / 100


GenerativeMetric = Callable[[Sequence[str], Sequence[str]], float]
GENERATIVE_METRICS: dict[str, tuple[GenerativeMetric, ...]] = {
    "query_rewriting": (rouge_l,),
    "sequential_recommendation": (option_accuracy,),
    # The builder's full label sets: a prediction naming a class no test row has is then a false positive of
    # that class, not silently unparsed.
    "product_relation_prediction": (partial(macro_f1, labels=RELATIONS),),
    "sentiment_analysis": (partial(macro_f1, labels=SENTIMENTS),),
    "attribute_value_extraction": (attribute_f1,),
    "product_matching": (binary_f1,),
    "user_profile": (rouge_l,),
    "item_profile": (rouge_l,),
    "answerability_prediction": (binary_f1,),
    "answer_generation": (rouge_l,),
    "explanation_generation": (rouge_l, bleu4),  # P5 reports both for explanations
    # yes/no per row; its ranking metrics come from the candidate-list protocol (eval/candidate_lists.py)
    "candidate_ranking": (binary_f1,),
}
"""The metrics per generative task, the paper's first (its headline in reports and verdicts), with ROUGE-L standing
in for BERTScore-F1. Each scorer reads the builder's response formats: SR a letter, SA and PRP the option text, PM
and AP yes/no, AVE "attr: value; ..."."""


def metric_name(metric: GenerativeMetric) -> str:
    """The metric's function name ("macro_f1" for a partial of it): the key results.json stores it under."""
    return getattr(metric, "func", metric).__name__

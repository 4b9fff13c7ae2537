"""Paired bootstrap intervals: a real difference is settled, a coin flip is not, and pairing removes the queries'
shared difficulty (what an unpaired comparison of two means would count as noise)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recfound.eval.metrics import macro_f1
from recfound.eval.significance import mean_difference, metric_difference, settled


def test_a_consistent_gain_is_settled_even_when_query_difficulty_varies_widely() -> None:
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0, 0.9, 100)  # spread far wider than the gain: unpaired means would overlap
    low, high = mean_difference(difficulty + 0.05, difficulty)
    assert low == pytest.approx(0.05) and high == pytest.approx(0.05) and settled((low, high))
    noisy = mean_difference(difficulty + 0.05 + rng.normal(0, 0.05, 100), difficulty)
    assert noisy[0] < 0.05 < noisy[1] and settled(noisy)


def test_no_difference_and_a_coin_flip_are_not_settled() -> None:
    rng = np.random.default_rng(1)
    same = rng.uniform(0, 1, 50)
    assert mean_difference(same, same) == (0.0, 0.0) and not settled((0.0, 0.0))
    flip = mean_difference(rng.integers(0, 2, 50), rng.integers(0, 2, 50))
    assert flip[0] < 0 < flip[1] and not settled(flip)


def test_undefined_queries_are_left_out_and_the_pairs_must_match() -> None:
    low, high = mean_difference([1.0, None, 1.0, float("nan")], [0.0, 0.5, 0.0, 0.0])  # 2 defined pairs, both +1
    assert (low, high) == (1.0, 1.0)
    assert all(math.isnan(x) for x in mean_difference([1.0], [0.0]))  # one query: no interval
    with pytest.raises(ValueError, match="same queries"):
        mean_difference([1.0, 0.0], [0.0])


def test_a_corpus_metric_is_recomputed_per_resample_and_is_seeded() -> None:
    refs = ["positive", "negative"] * 20
    always = ["positive"] * 40
    f1 = lambda p, r: macro_f1(p, r, ["positive", "negative"])  # noqa: E731
    exact = metric_difference(f1, [refs], [always], refs)
    assert settled(exact) and exact[0] > 0.3  # the evidence reader beats always-"positive" (F1 1.0 vs ~0.33)
    assert metric_difference(f1, [refs], [always], refs) == exact
    # Two seeds, one exact and one always "positive": their mean against always-"positive" is half the gain.
    halved = metric_difference(f1, [refs, always], [always], refs)
    assert halved[0] == pytest.approx(exact[0] / 2) and halved[1] == pytest.approx(exact[1] / 2)
    # Seeds on both sides (an ablation: recipe vs variant): each side is its runs' mean, so the same pair of runs
    # on both sides differs by nothing, and a side's extra exact run moves the difference by its share.
    assert metric_difference(f1, [refs, always], [always, refs], refs) == (0.0, 0.0)
    quarter = metric_difference(f1, [refs, always], [always, always, refs, always], refs)
    assert quarter[0] == pytest.approx(exact[0] / 4) and quarter[1] == pytest.approx(exact[1] / 4)
    with pytest.raises(ValueError, match="same prompts"):
        metric_difference(macro_f1, [refs], [refs[:-1]], refs)

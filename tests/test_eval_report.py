"""Report pieces on hand-made results: average rank, tables, plots, and convergence from a hand-made metrics.jsonl."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from recfound.eval.convergence import balance, find_history, summarize, task_convergence, trailing_mean
from recfound.eval.report import average_ranks, headline, sections, tables, write_report

SYSTEMS = {
    "recfound": {
        "u2i": {"pool.mrr@20": 0.5, "full.mrr": 0.2},
        "i2i": {"pool.ndcg@20": 0.9},
        "sentiment_analysis": {"macro_f1": 0.4},
    },
    "bm25": {"u2i": {"pool.mrr@20": 0.3, "full.mrr": 0.2}, "i2i": {"pool.ndcg@20": 0.95}},
    "item_cf": {
        "u2i": {"pool.mrr@20": 0.5, "full.mrr": None},
        "candidate_ranking": {"list.ndcg@10": 0.6, "list.auc": 0.7},
    },
}

# Per-step losses: a falls 10 -> 6, b reaches 3 only at step 5, c never moves; d is trained only from step 2.
LOSSES = {
    "a": [10, 9, 7, 8, 6],
    "b": [4, 4, 4, 4, 3],
    "c": [2, 2, 2, 2, 2],
}
HISTORY = [
    {
        "step": s + 1,
        "losses": {t: v[s] for t, v in LOSSES.items()} | ({"d": 5.0} if s >= 1 else {}),
        "weights": {"a": 0.5, "b": 0.3, "c": 0.2},
        "rows": {"a": 2, "b": 1, "c": 1} | ({"d": 3} if s >= 1 else {}),
    }
    for s in range(5)
]


def test_average_rank_ties_share_and_a_missing_value_ranks_last() -> None:
    columns = [("u2i", "pool.mrr@20"), ("i2i", "pool.ndcg@20")]
    ranks = average_ranks(SYSTEMS, columns)
    # u2i: recfound and item_cf tie for 1-2 (1.5 each), bm25 3; i2i: bm25 1, recfound 2, item_cf missing -> 3
    assert ranks.loc["recfound", "rank"] == pytest.approx((1.5 + 2) / 2)
    assert ranks.loc["bm25", "rank"] == pytest.approx((3 + 1) / 2)
    assert ranks.loc["item_cf", "rank"] == pytest.approx((1.5 + 3) / 2)
    assert ranks["columns"].to_dict() == {"recfound": 2, "bm25": 2, "item_cf": 1}


def test_tables_list_each_protocol_with_only_the_systems_that_can_do_it() -> None:
    assert [s.image for s in sections(SYSTEMS)] == ["pool.png", "full.png", "generative.png", "lists.png"]
    assert headline("q2i") == "pool.mrr@20" and headline("i2i") == "pool.ndcg@20"
    assert headline("candidate_ranking") == "list.ndcg@10"  # the metric every system has, not the GRMs' yes/no F1
    assert headline("sentiment_analysis") == "macro_f1" and headline("sequential_recommendation") == "option_accuracy"
    text = tables(SYSTEMS)
    generative = text.split("### Generative")[1].split("###")[0]
    assert "| recfound | 0.400 |" in generative and "bm25" not in generative
    pool = text.split("### Embedding, paper protocol")[1].split("###")[0]
    assert "| item_cf | 0.500 | – | – |" in pool  # no i2i value: shown as –, and no mean over a partial row
    assert "| recfound | 0.500 | 0.900 | 0.700 |" in pool
    lists = text.split("### Candidate lists")[1].split("###")[0]
    assert "| item_cf | 0.600 | 0.700 | 0.650 | 1.000 |" in lists and "recfound" not in lists


def test_write_report_writes_markdown_and_one_png_per_protocol(tmp_path: Path) -> None:
    results = {
        "systems": SYSTEMS,
        "model": "m",
        "model_kind": "checkpoint",
        "data": "d",
        "split": "test",
        "seed": 42,
        "queries": {"u2i": 3},
        "seconds": {"recfound": 1.0},
        "cpu_seconds": {"recfound": 0.5},
        "skipped": {"minilm": "not installed"},
        "convergence": summarize(HISTORY, 0.8, 1),
    }
    files = write_report(results, tmp_path, {"recfound": HISTORY})
    names = {f.name for f in files}
    assert {"report.md", "pool.png", "full.png", "generative.png", "lists.png", "losses.png", "weights.png"} <= names
    for f in files:
        assert f.is_file() and (f.suffix != ".png" or f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n")
    report = (tmp_path / "report.md").read_text()
    assert "Skipped minilm: not installed" in report and "## Training convergence" in report
    assert "| a | 10.000 | 6.000 | 0.600 | 3 | 10 |" in report


def test_convergence_matches_hand_computed_steps() -> None:
    conv = task_convergence(HISTORY, target=0.8, window=1)
    # a: 0.8 x 10 = 8, first loss <= 8 is 7 at step 3; b: 3.2 reached at step 5; c never; d: 5 -> never
    assert {t: c.step for t, c in conv.items()} == {"a": 3, "b": 5, "c": None, "d": None}
    assert conv["a"].initial == 10 and conv["a"].final == 6 and conv["a"].ratio == pytest.approx(0.6)
    b = balance(conv)
    assert (b["converged"], b["total"], b["first"], b["last"], b["spread"]) == (2, 4, 3, 5, 2)
    assert b["ratio_std"] == pytest.approx(float(np.std([0.6, 0.75, 1.0, 1.0])))


def test_convergence_counts_the_rows_each_task_was_trained_on() -> None:
    """Summed over the steps (d joins at step 2); a history from before rows were recorded says so (None), not 0."""
    conv = task_convergence(HISTORY, target=0.8, window=1)
    assert {t: c.rows for t, c in conv.items()} == {"a": 10, "b": 5, "c": 5, "d": 12}
    older = [{k: v for k, v in row.items() if k != "rows"} for row in HISTORY]
    assert {c.rows for c in task_convergence(older, window=1).values()} == {None}


def test_convergence_smooths_with_a_trailing_window() -> None:
    assert trailing_mean(np.array([10.0, 9, 7, 8, 6]), 2).tolist() == [9.5, 8, 7.5, 7]
    conv = task_convergence(HISTORY, target=0.8, window=2)
    # a: initial 9.5 -> target 7.6; trailing means 8 (step 3), 7.5 (step 4): step 4. d has 4 values: initial 5.
    assert conv["a"].step == 4 and conv["a"].initial == 9.5 and conv["a"].final == 7.0
    assert conv["d"].initial == 5.0 and conv["d"].step is None
    assert "d" not in task_convergence(HISTORY, window=5)  # fewer recorded losses than the window


def test_find_history_in_a_checkpoint_or_a_run_directory(tmp_path: Path) -> None:
    for name in ("checkpoint_2026-01-01_00-00-00.000001", "checkpoint_2026-01-01_00-00-09.000001"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps(HISTORY[0]) + "\n")
    latest = tmp_path / "checkpoint_2026-01-01_00-00-09.000001" / "metrics.jsonl"
    assert find_history(tmp_path) == latest
    assert find_history(latest.parent) == latest and find_history(latest) == latest
    assert find_history(tmp_path / "nothing") is None


def test_summary_is_json_ready() -> None:
    summary = json.loads(json.dumps(summarize(HISTORY, 0.8, 1)))
    assert summary["tasks"]["c"]["step"] is None and math.isclose(summary["tasks"]["a"]["ratio"], 0.6)
    assert summary["steps"] == 5 and summary["balance"]["spread"] == 2

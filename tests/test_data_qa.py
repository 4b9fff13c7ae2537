"""Question answering from raw dumps (qa=): McAuley's Python-literal lines and AmazonQA's JSON lines."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from data_fixtures import read_task, review, write_lines

from recfound.data.builder import BuildConfig, build
from recfound.data.sources import DataError
from recfound.data.templates import NO, YES

pytestmark = pytest.mark.usefixtures("shared_ray")  # one local Ray for the module's builds (conftest.py)

REVIEWS = [review(f"u{u}", f"p{i}", 1000 * u + i, summary=f"good p{i}") for u in range(1, 5) for i in range(1, 4)]
MCAULEY_SINGLE = {
    "questionType": "yes/no",
    "asin": "p1",
    "question": "Does it fit a 9 inch pan?",
    "answerType": "Y",
    "answer": "Yes, it fits.",
}
MCAULEY_MULTI = {
    "asin": "p2",
    "questions": [
        {
            "questionText": "How loud is it?",
            "answers": [
                {"answerText": "Loud.", "helpful": [0, 1]},
                {"answerText": "Quiet enough for a flat.", "helpful": [5, 6]},
            ],
        },
        {"questionText": "Unanswered?", "answers": []},
    ],
}
OFF_CATALOGUE = {"asin": "zz9", "question": "Is it blue?", "answer": "No, grey."}
AMAZONQA = [
    {
        "asin": "p3",
        "questionText": "Is the cord long?",
        "answers": [{"answerText": "About 2 m.", "helpful": [1, 1]}],
        "review_snippets": ["The cord is two metres long.", "Works well."],
        "is_answerable": True,
    },
    {
        "asin": "p3",
        "questionText": "Does it come in red?",
        "answers": [{"answerText": "Not that I know."}],
        "review_snippets": ["Works well."],
        "is_answerable": False,
    },
]


def _python_lines(path: Path, rows: list[dict]) -> str:
    """McAuley's format: each line is Python's repr of a dict (single quotes), gzip-compressed."""
    path.write_bytes(gzip.compress("".join(repr(r) + "\n" for r in rows).encode()))
    return str(path)


def _build(tmp_path: Path, qa: str, **overrides) -> dict:
    reviews = write_lines(tmp_path / "reviews.json", REVIEWS)
    return build(BuildConfig(reviews=reviews, qa=qa, out=str(tmp_path / "out"), kcore=1, holdout=0.01, **overrides))


def _rows(tmp_path: Path, task: str) -> list[dict]:
    return [r for split in ("train", "valid", "test") for r in read_task(tmp_path / "out", task, split)]


def test_mcauley_dumps_give_one_answer_row_per_answered_question(tmp_path: Path) -> None:
    qa = _python_lines(tmp_path / "qa.json.gz", [MCAULEY_SINGLE, MCAULEY_MULTI, OFF_CATALOGUE])
    manifest = _build(tmp_path, qa)
    rows = {r["prompt"].split("Question: ")[1].split("\n")[0]: r for r in _rows(tmp_path, "answer_generation")}
    assert {q: r["response"] for q, r in rows.items()} == {
        "Does it fit a 9 inch pan?": "Yes, it fits.",
        "How loud is it?": "Quiet enough for a flat.",  # the most helpful answer, not the first
        "Is it blue?": "No, grey.",
    }
    fits = rows["Does it fit a 9 inch pan?"]["prompt"]  # a catalogue product: its text and its training reviews
    assert "Product: Title: " in fits and "- good p1, really" in fits
    assert "good p2" not in rows["How loud is it?"]["prompt"]  # p2's reviews are all held out (valid)
    assert "Product:" not in rows["Is it blue?"]["prompt"] and "Reviews:" not in rows["Is it blue?"]["prompt"]
    assert manifest["qa"] == {
        "questions": 3,
        "products": 3,
        "products_in_catalogue": 2,
        "questions_with_product_text": 2,
        "answerability_labels": 0,
    }
    assert "no answerability label" in manifest["skipped_tasks"]["answerability_prediction"]


def test_amazonqa_lines_give_answerability_labels_and_snippets(tmp_path: Path) -> None:
    manifest = _build(tmp_path, write_lines(tmp_path / "amazonqa.jsonl", AMAZONQA))
    labels = {
        r["prompt"].split("Question: ")[1].split("\n")[0]: r["response"]
        for r in _rows(tmp_path, "answerability_prediction")
    }
    assert labels == {"Is the cord long?": YES, "Does it come in red?": NO}
    [cord] = [r for r in _rows(tmp_path, "answer_generation") if "cord" in r["prompt"]]
    assert "- The cord is two metres long." in cord["prompt"] and cord["response"] == "About 2 m."
    assert manifest["tasks"]["answerability_prediction"] and manifest["qa"]["answerability_labels"] == 2


@pytest.mark.parametrize(
    "line",
    [
        "__import__('os').system('echo pwned')",
        "{'asin': 'p1', 'question': ",
        "{'asin': 'p1', 'question': 'q?', 'answer': 3}",
    ],
)
def test_a_bad_line_is_named_and_never_evaluated(tmp_path: Path, line: str) -> None:
    qa = tmp_path / "qa.txt"
    qa.write_text(repr(MCAULEY_SINGLE) + "\n" + line + "\n" + repr(OFF_CATALOGUE) + "\n")
    with pytest.raises(DataError, match="qa.txt line 2"):
        _build(tmp_path, str(qa))
    manifest = _build(tmp_path, str(qa), on_bad_rows="skip", max_bad_fraction=0.5)
    assert manifest["qa"]["questions"] == 2 and manifest["quarantined"]["total"] == 1

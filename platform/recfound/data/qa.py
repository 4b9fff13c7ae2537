"""Amazon product question answering dumps -> questions with their answers, and the two QA task builders.

Two releases, detected per line: McAuley's (Python dict literals, not JSON; single-answer lines with
``question``/``answer``, multi-answer lines with ``questions: [{questionText, answers: [{answerText, helpful}]}]``),
parsed with ``ast.literal_eval``, never ``eval``; and AmazonQA's JSON lines (``questionText``, ``answers``,
``review_snippets``, ``is_answerable``). Only AmazonQA labels answerability.
"""

from __future__ import annotations

import ast
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from recfound.data.behaviour import ITEM_REVIEWS
from recfound.data.context import Context
from recfound.data.rows import GenerativeRow, Sample, TaskUnavailable
from recfound.data.sources import BadRows, DataError, Fields, Inputs, as_files, read_lines, show
from recfound.data.templates import INSTRUCTIONS, NO, YES, alpaca, pick

SNIPPETS = ITEM_REVIEWS
"""Review texts shown with a question: AmazonQA's snippets, or else the product's own earliest training reviews."""
SNIPPET_WORDS = 60


@dataclass(frozen=True)
class Question:
    item: str
    question: str
    answers: tuple[str, ...]
    """Most helpful first (votes where the dump has them, else file order)."""
    answerable: bool | None = None
    """AmazonQA's ``is_answerable``; None where the release carries no label."""
    snippets: tuple[str, ...] = ()


def parse_record(url: str, line: int, text: str) -> Any:
    """A JSON object, or a Python dict literal: McAuley's dumps were written with Python's ``repr``."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError):
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as err:
        raise DataError(url, f"neither JSON nor a Python literal ({type(err).__name__})", line) from None


def _answers(fields: Fields, key: str) -> tuple[str, ...]:
    """``answers: [{answerText, helpful: [up, total]}]`` -> texts, most up-votes first (stable)."""
    value = fields.row.get(key)
    if not isinstance(value, list) or not all(isinstance(a, dict) for a in value):
        raise fields.error(key, f"expected a list of answer objects, got {show(value)}")
    ranked = []
    for i, answer in enumerate(value):
        one = Fields(fields.url, fields.line, answer)
        helpful = answer.get("helpful")
        votes = helpful[0] if isinstance(helpful, list) and helpful and isinstance(helpful[0], int) else 0
        if text := one.text("answerText"):
            ranked.append((-votes, i, text))
    return tuple(text for *_, text in sorted(ranked))


def _questions(fields: Fields) -> Iterator[Question]:
    item = fields.text("asin", required=True)
    if "questions" in fields.row:  # McAuley multi-answer: one line per product
        entries = fields.row["questions"]
        if not isinstance(entries, list):
            raise fields.error("questions", f"expected a list of questions, got {show(entries)}")
        for entry in entries:
            one = Fields(fields.url, fields.line, entry)
            yield Question(item, one.text("questionText", required=True), _answers(one, "answers"))
    elif "questionText" in fields.row:  # AmazonQA
        label = fields.row.get("is_answerable")
        if label is not None and label not in (0, 1):  # True/False are 1/0
            raise fields.error("is_answerable", f"expected a boolean, got {show(label)}")
        yield Question(
            item,
            fields.text("questionText", required=True),
            _answers(fields, "answers"),
            None if label is None else bool(label),
            fields.strings("review_snippets"),
        )
    else:  # McAuley single answer
        yield Question(item, fields.text("question", required=True), (fields.text("answer", required=True),))


def read_qa(urls: Inputs, bad: BadRows) -> list[Question]:
    """Every question with at least one answer, files in the order given (McAuley's dumps come one per category); a
    malformed line is a DataError naming file, line and field."""
    return [q for url in as_files(urls) for q in _read_qa_file(url, bad)]


def _read_qa_file(url: str, bad: BadRows) -> list[Question]:
    out: list[Question] = []
    seen = 0
    for line, text in read_lines(url):
        seen += 1
        try:
            out += [q for q in _questions(Fields(url, line, parse_record(url, line, text))) if q.answers]
        except DataError as err:
            bad.report(err)
    if not seen:
        raise DataError(url, "empty file: no rows")
    bad.check(url, seen)
    return out


def _words(text: str) -> str:
    return " ".join(text.split()[:SNIPPET_WORDS])


def _input(ctx: Context, q: Question) -> str:
    """The question with what is known of its product: catalogue text where it joins, and review texts."""
    parts = []
    if (item := ctx.catalogue.get(q.item)) is not None:
        parts.append(f"Product: {item.text}")
    reviews = q.snippets or ctx.item_reviews(q.item)
    if reviews:
        parts.append("Reviews:\n" + "\n".join(f"- {_words(r)}" for r in reviews[:SNIPPETS]))
    return "\n".join([*parts, f"Question: {q.question}"])


def _require(ctx: Context) -> None:
    if not ctx.questions:
        raise TaskUnavailable("needs a product question-answer file (qa=: McAuley's QA dumps or AmazonQA)")


def build_answer_generation(ctx: Context) -> list[Sample]:
    """Question + product text and reviews -> its most helpful answer; one row per question."""
    task = "answer_generation"
    _require(ctx)
    out: list[Sample] = []
    for n, q in enumerate(ctx.questions):
        rng = ctx.rng(task, q.item, q.question, n)
        row = GenerativeRow(alpaca(pick(rng, INSTRUCTIONS[task]), _input(ctx, q)), q.answers[0], "", q.item, "qa")
        out.append((ctx.split(f"qa:{q.item}:{q.question}"), row))
    return out


def build_answerability_prediction(ctx: Context) -> list[Sample]:
    """Question + review snippets -> yes/no: can the reviews answer it (AmazonQA's label)."""
    task = "answerability_prediction"
    _require(ctx)
    labelled = [q for q in ctx.questions if q.answerable is not None]
    if not labelled:
        raise TaskUnavailable(
            "the QA file carries no answerability label (McAuley's releases have none; AmazonQA's "
            "is_answerable is needed)"
        )
    out: list[Sample] = []
    for n, q in enumerate(labelled):
        rng = ctx.rng(task, q.item, q.question, n)
        prompt = alpaca(pick(rng, INSTRUCTIONS[task]), _input(ctx, q), (YES, NO))
        row = GenerativeRow(prompt, YES if q.answerable else NO, "", q.item, "qa")
        out.append((ctx.split(f"qa:{q.item}:{q.question}"), row))
    return out


def qa_counts(ctx: Context) -> dict[str, int]:
    """For the manifest: how many questions, products, and products that join the catalogue."""
    products = Counter(q.item for q in ctx.questions)
    joined = [p for p in products if p in ctx.catalogue]
    return {
        "questions": len(ctx.questions),
        "products": len(products),
        "products_in_catalogue": len(joined),
        "questions_with_product_text": sum(products[p] for p in joined),
        "answerability_labels": sum(q.answerable is not None for q in ctx.questions),
    }

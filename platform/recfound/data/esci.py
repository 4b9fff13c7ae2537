"""Shopping Queries (ESCI) judgements: parquet, CSV, JSON lines, or the OpenSearch judgement-list JSON.

The format is detected from the file's content, not its name, because the same table circulates under many
names (``shopping_queries_dataset_examples.parquet``, ``esci_us_judgments.json``, exported CSVs).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recfound.data.sources import (
    UNREADABLE,
    BadRows,
    DataError,
    Inputs,
    as_files,
    check_text,
    clean_text,
    named,
    parse_json,
    show,
)
from recfound.io import open_binary

REQUIRED = ("query", "product_id", "esci_label")
OPTIONAL = ("product_title", "product_brand")
Row = dict[str, Any] | DataError  # a row, or why it could not be read (reported in order, then skipped)


class Esci(str, Enum):
    """ESCI relevance label of a (query, product) pair."""

    EXACT = "E"
    SUBSTITUTE = "S"
    COMPLEMENT = "C"
    IRRELEVANT = "I"


_LABELS = {**{e.value: e for e in Esci}, **{e.name.lower(): e for e in Esci}}
# OpenSearch judgement lists scale the ESCI gains by 100: 100 exact, 10 substitute, 1 complement, 0 irrelevant.
_GRADES = {100.0: Esci.EXACT, 10.0: Esci.SUBSTITUTE, 1.0: Esci.COMPLEMENT, 0.0: Esci.IRRELEVANT}


@dataclass(frozen=True)
class QueryJudgement:
    """One judged (query, product) pair; ``title``/``brand`` are empty when the source has no product text."""

    query: str
    item: str
    label: Esci
    title: str = ""
    brand: str = ""


def _judgement(row: dict[str, Any], url: str, number: int, unit: str) -> QueryJudgement:
    def text(key: str, required: bool) -> str:
        value = row.get(key)
        if value is None or value == "":
            if required:
                raise DataError(url, "missing required field", number, key, unit)
            return ""
        if isinstance(value, str):
            return clean_text(check_text(value, url, number, key, unit))
        if not isinstance(value, int):  # CSV/parquet ids may come back as numbers
            raise DataError(url, f"expected a string, got {type(value).__name__} {show(value)}", number, key, unit)
        return str(value)

    query, item, raw = text("query", True), text("product_id", True), text("esci_label", True)
    label = _LABELS.get(raw) or _LABELS.get(raw.lower())
    if label is None:
        raise DataError(url, f"unknown ESCI label {raw!r}, expected one of E, S, C, I", number, "esci_label", unit)
    return QueryJudgement(query.lower(), item, label, text("product_title", False), text("product_brand", False))


def _opensearch_rows(url: str, doc: dict[str, Any]) -> Iterator[tuple[int, Row]]:
    """Flatten ``judgmentRatings[q].ratings[r]``; the row number counts pairs in file order."""
    number = 0
    for entry in doc["judgmentRatings"]:
        ratings = entry.get("ratings") if isinstance(entry, dict) else None
        if not isinstance(ratings, list):
            number += 1
            yield number, DataError(url, "expected {query, ratings: [...]}", number, "judgmentRatings", "row")
            continue
        for rating in ratings:
            number += 1
            grade = None
            if isinstance(rating, dict):
                try:
                    grade = _GRADES.get(float(rating.get("rating")))
                except (TypeError, ValueError, OverflowError):
                    pass
            if grade is None:
                yield (
                    number,
                    DataError(
                        url, f"expected a rating of 100, 10, 1 or 0, got {show(rating)}", number, "rating", "row"
                    ),
                )
                continue
            yield number, {"query": entry.get("query"), "product_id": rating.get("docId"), "esci_label": grade.value}


def _raw_rows(url: str) -> tuple[str, Iterator[tuple[int, Row]]]:
    """(unit, numbered rows): parquet rows, CSV rows (line numbers, header is line 1), or JSON lines."""
    try:
        with open_binary(url) as handle:
            data = handle.read()
        text = "" if data[:4] == b"PAR1" else data.decode("utf-8")
    except UNREADABLE as err:
        raise DataError(url, f"cannot read the file: {err}") from None
    if not data.strip():
        raise DataError(url, "empty file: no rows")
    if data[:4] == b"PAR1":
        return "row", enumerate(_parquet_rows(url, data), start=1)
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            doc = None  # not one document: JSON lines, where each bad line is reported
        if isinstance(doc, dict) and "judgmentRatings" in doc:
            if not isinstance(doc["judgmentRatings"], list):
                raise DataError(url, "expected a list of {query, ratings}", field="judgmentRatings")
            return "row", _opensearch_rows(url, doc)
        return "line", _json_lines(url, text)
    reader = csv.DictReader(io.StringIO(text))
    try:
        names = reader.fieldnames or []
    except csv.Error as err:
        raise DataError(url, f"malformed CSV header: {err}", 1) from None
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise DataError(url, "missing required column", 1, missing[0])
    return "line", _csv_rows(url, reader)


def _parquet_rows(url: str, data: bytes) -> list[dict[str, Any]]:
    """The judgement columns of a parquet file; a damaged one is a DataError, not an Arrow exception."""
    try:
        names = pq.read_schema(io.BytesIO(data)).names
        missing = [c for c in REQUIRED if c not in names]
        if missing:
            raise DataError(url, "missing required column", field=missing[0])
        return pq.read_table(io.BytesIO(data), columns=[c for c in (*REQUIRED, *OPTIONAL) if c in names]).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise DataError(url, f"cannot read the parquet file: {err}") from None


def _csv_rows(url: str, reader: csv.DictReader) -> Iterator[tuple[int, Row]]:
    try:
        for row in reader:
            yield reader.line_num, row
    except csv.Error as err:  # the reader cannot resynchronise after a broken line: stop here
        raise DataError(url, f"malformed CSV: {err}", reader.line_num) from None


def _json_lines(url: str, text: str) -> Iterator[tuple[int, Row]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = parse_json(url, number, line)
        except DataError as err:
            yield number, err
            continue
        if not isinstance(row, dict):
            row = DataError(url, f"expected a JSON object, got {type(row).__name__}", number)
        yield number, row


def read_queries(urls: Inputs, bad: BadRows) -> list[QueryJudgement]:
    """Judgements in file order, files in the order given; a repeated (query, product) pair keeps its first label."""
    files = as_files(urls)
    out: dict[tuple[str, str], QueryJudgement] = {}
    for url in files:
        _read_query_file(url, bad, out)
    if not out:
        raise DataError(named(files), "no usable query judgements")
    return list(out.values())


def _read_query_file(url: str, bad: BadRows, out: dict[tuple[str, str], QueryJudgement]) -> None:
    """Adds one file's judgements to ``out`` (first label wins); each file detects its own format."""
    unit, rows = _raw_rows(url)
    total = 0
    for number, row in rows:
        total += 1
        try:
            if isinstance(row, DataError):
                raise row
            judgement = _judgement(row, url, number, unit)
        except DataError as err:
            bad.report(err)
            continue
        out.setdefault((judgement.query, judgement.item), judgement)
    bad.check(url, total)

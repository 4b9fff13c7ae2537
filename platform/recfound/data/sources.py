"""Amazon review and metadata dumps (2018 and 2023 schemas) -> normalised records.

Every malformed line becomes a DataError naming file, line and field, so a bad dump is fixed at its source
instead of being guessed around; with the ``skip`` policy the same error is counted and quarantined.
"""

from __future__ import annotations

import html
import json
import math
import re
import reprlib
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from recfound.io import iter_lines

BadRowPolicy = Literal["error", "skip"]
Inputs = str | Sequence[str]
"""One file, or several read one after another as if they were one (each keeps its own name and line numbers)."""
UNREADABLE = (UnicodeDecodeError, EOFError, OSError, zlib.error)
"""How reading a damaged file fails: bad UTF-8, a truncated or corrupted gzip stream (zlib.error is no OSError)."""
_INT64 = 2**63
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_PREVIEW = reprlib.Repr()
_PREVIEW.maxlevel, _PREVIEW.maxstring, _PREVIEW.maxother = 3, 60, 60


class DataError(ValueError):
    """An input that cannot be used; the message names the file, the line (or row) and the field."""

    def __init__(self, url: str, reason: str, line: int | None = None, field: str | None = None, unit: str = "line"):
        self.url, self.reason, self.line, self.field, self.unit = url, reason, line, field, unit
        where = url if line is None else f"{url} {unit} {line}"
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}: {what}{reason}")

    def __reduce__(self) -> tuple[type[DataError], tuple[str, str, int | None, str | None, str]]:
        """Rebuilt from its parts when it crosses from a Ray read task to the driver (the message alone is not)."""
        return DataError, (self.url, self.reason, self.line, self.field, self.unit)

    def record(self) -> dict[str, Any]:
        return {"file": self.url, "line": self.line, "field": self.field, "reason": self.reason}


def as_files(urls: Inputs) -> list[str]:
    """The readers take one URL (as they always did) or the files an input spec expanded to."""
    return [urls] if isinstance(urls, str) else list(urls)


def named(files: Sequence[str]) -> str:
    """How an error about a whole input names it: one file as itself (as before), shards by count and range."""
    return files[0] if len(files) == 1 else f"{files[0]} .. {files[-1]} ({len(files)} files)"


def show(value: Any) -> str:
    """A bounded preview for messages: a plain repr of a huge or deeply nested value is slow or a RecursionError."""
    return _PREVIEW.repr(value)


def check_text(value: str, url: str, line: int, key: str, unit: str = "line") -> str:
    """Reject lone surrogates: JSON's ``"\\ud800"`` parses to a str that no UTF-8 writer or hash can encode."""
    bad = _SURROGATE.search(value)
    if bad:
        raise DataError(url, f"lone surrogate {bad.group()!r} is not valid Unicode", line, key, unit)
    return value


def parse_json(url: str, line: int, text: str) -> Any:
    """``json.loads`` with every way a line fails to parse, not only JSONDecodeError, reported at that line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(url, f"malformed JSON ({err.msg} at column {err.colno})", line) from None
    except RecursionError:
        raise DataError(url, "malformed JSON (nested too deeply to parse)", line) from None
    except ValueError as err:  # an integer literal past Python's digit limit
        raise DataError(url, f"malformed JSON ({str(err).split(':')[0]})", line) from None


@dataclass
class BadRows:
    """Collects malformed rows under the ``skip`` policy, up to ``max_fraction`` of a file; under ``error`` the first
    one stops the build."""

    policy: BadRowPolicy = "error"
    max_fraction: float = 1.0
    """Under ``skip``, the share of one file's rows that may be bad; above it the file is likely not the one meant."""
    quarantine: str = ""
    """Where the collected rows are written, named in the limit's error (empty: the caller keeps them)."""
    rows: list[dict[str, Any]] = field(default_factory=list)

    def report(self, err: DataError) -> None:
        if self.policy == "error":
            raise err
        self.rows.append(err.record())

    def check(self, url: str, total: int) -> None:
        """Called once a file of ``total`` rows is read: skipping stops being an option past ``max_fraction``."""
        bad = self.counts().get(url, 0)
        if total and bad / total > self.max_fraction:
            where = f"; they are listed in {self.quarantine}" if self.quarantine else ""
            raise DataError(
                url,
                f"{bad} of {total} rows are malformed ({bad / total:.1%}), more than "
                f"max_bad_fraction={self.max_fraction:g}{where}",
            )

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            out[row["file"]] = out.get(row["file"], 0) + 1
        return out


@dataclass(frozen=True)
class Interaction:
    """One review: the user consumed the item at ``timestamp`` (unix seconds) and rated it."""

    user: str
    item: str
    timestamp: int
    rating: float
    summary: str = ""
    text: str = ""


@dataclass(frozen=True)
class Item:
    """Catalogue metadata of one item; every text field may be empty (real dumps often are)."""

    item_id: str
    title: str = ""
    description: str = ""
    categories: tuple[str, ...] = ()
    brand: str = ""
    features: tuple[str, ...] = ()
    also_buy: tuple[str, ...] = ()
    also_view: tuple[str, ...] = ()


class Schema(Enum):
    """Amazon Reviews release; the field names differ, the meaning does not."""

    AMAZON_2018 = "amazon2018"
    AMAZON_2023 = "amazon2023"


# 2023 first: its rows also carry "asin", so only "parent_asin" tells the releases apart.
REVIEW_FIELDS = {
    Schema.AMAZON_2023: {
        "user": "user_id",
        "item": "parent_asin",
        "rating": "rating",
        "time": "timestamp",
        "summary": "title",
        "text": "text",
    },
    Schema.AMAZON_2018: {
        "user": "reviewerID",
        "item": "asin",
        "rating": "overall",
        "time": "unixReviewTime",
        "summary": "summary",
        "text": "reviewText",
    },
}
META_FIELDS = {
    Schema.AMAZON_2023: {
        "item": "parent_asin",
        "categories": "categories",
        "brand": "store",
        "features": "features",
        "main": "main_category",
    },
    Schema.AMAZON_2018: {
        "item": "asin",
        "categories": "category",
        "brand": "brand",
        "features": "feature",
        "main": "main_cat",
    },
}

_TAG = re.compile(r"<[^>]*(>|$)")
_SPACE = re.compile(r"\s+")


def clean_text(raw: str) -> str:
    """Dumps carry HTML fragments and entities (``&amp;``, stray ``<span ...``); keep only the words."""
    return _SPACE.sub(" ", _TAG.sub(" ", html.unescape(raw))).strip()


class Fields:
    """Typed access to one parsed JSON line, raising DataError that names the file, line and field."""

    def __init__(self, url: str, line: int, row: Any):
        if not isinstance(row, dict):
            raise DataError(url, f"expected a JSON object, got {type(row).__name__}", line)
        self.url, self.line, self.row = url, line, row

    def error(self, key: str, reason: str) -> DataError:
        return DataError(self.url, reason, self.line, key)

    def clean(self, key: str, value: str) -> str:
        return clean_text(check_text(value, self.url, self.line, key))

    def text(self, key: str, required: bool = False, paragraphs: bool = False) -> str:
        value = self.row.get(key)
        if value is None or (required and value == ""):
            if required:
                raise self.error(key, "missing required field")
            return ""
        if paragraphs and isinstance(value, list):  # descriptions come as lists of paragraphs
            return " ".join(self.strings(key))
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {type(value).__name__} {show(value)}")
        return self.clean(key, value)

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.row.get(key)
        if value in (None, ""):
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"expected a list of strings, got {show(value)}")
        return tuple(t for t in (self.clean(key, v) for v in value) if t)

    def number(self, key: str) -> float:
        """A finite float: JSON from Python may hold NaN and Infinity, and 1e400 parses as infinity."""
        value = self.row.get(key)
        if value is None:
            raise self.error(key, "missing required field")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"expected a number, got {type(value).__name__} {show(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            number = math.inf
        if not math.isfinite(number):
            raise self.error(key, f"expected a finite number, got {show(value)}")
        return number

    def timestamp(self, key: str, per_second: int) -> int:
        """Unix seconds from a count of 1/per_second units, within the int64 column it is written to."""
        seconds = int(self.number(key) // per_second)
        if not -_INT64 <= seconds < _INT64:
            raise self.error(key, f"timestamp {show(seconds)} is outside the int64 range")
        return seconds


def read_lines(url: str) -> Iterator[tuple[int, str]]:
    """``iter_lines``, with an undecodable or truncated file reported as a DataError at the line it broke."""
    line = 0
    try:
        for line, text in iter_lines(url):
            yield line, text
    except UNREADABLE as err:  # text is decoded in blocks: no exact line
        raise DataError(url, f"cannot read past line {line}: {err}") from None


def _json_rows(url: str, bad: BadRows) -> Iterator[Fields]:
    seen = 0
    for line, text in read_lines(url):
        seen += 1
        try:
            yield Fields(url, line, parse_json(url, line, text))
        except DataError as err:
            bad.report(err)
    if not seen:
        raise DataError(url, "empty file: no rows")
    bad.check(url, seen)


def _detect(fields: Fields, tables: dict[Schema, dict[str, str]]) -> Schema:
    for schema, names in tables.items():
        if names["item"] in fields.row:
            return schema
    expected = " or ".join(f"{names['item']!r} ({schema.value})" for schema, names in tables.items())
    raise fields.error(tables[Schema.AMAZON_2018]["item"], f"unrecognised format: no item id, expected {expected}")


def _file_lines(url: str, bad: BadRows, tables: dict[Schema, dict[str, str]]) -> Iterator[tuple[Schema, Fields]]:
    """One file's rows. Its first usable line fixes the file's schema and its later lines must follow it: a comma
    list may mix a 2018 file with a 2023 one, as separate builds always could."""
    schema: Schema | None = None
    for fields in _json_rows(url, bad):
        try:
            schema = schema or _detect(fields, tables)
        except DataError as err:
            bad.report(err)
            continue
        yield schema, fields


def _review(schema: Schema, fields: Fields) -> Interaction:
    names = REVIEW_FIELDS[schema]
    rating = fields.number(names["rating"])
    if not 0 <= rating <= 5:
        raise fields.error(names["rating"], f"rating {rating} outside 0..5")
    return Interaction(
        user=fields.text(names["user"], required=True),
        item=fields.text(names["item"], required=True),
        timestamp=fields.timestamp(names["time"], 1000 if schema is Schema.AMAZON_2023 else 1),
        rating=rating,
        summary=fields.text(names["summary"]),
        text=fields.text(names["text"]),
    )


def _item(schema: Schema, fields: Fields) -> Item:
    names = META_FIELDS[schema]
    item_id = fields.text(names["item"], required=True)
    categories = fields.strings(names["categories"]) or fields.strings(names["main"])  # checked in this order
    return Item(
        item_id=item_id,
        title=fields.text("title"),
        description=fields.text("description", paragraphs=True),
        categories=categories,
        brand=fields.text(names["brand"]),
        features=fields.strings(names["features"]),
        also_buy=fields.strings("also_buy"),
        also_view=fields.strings("also_view"),
    )


def reviews_in(url: str, bad: BadRows) -> Iterator[tuple[int, Interaction]]:
    """(line, review) for each well-formed review of one file, in file order: the unit a parallel read task
    streams, and the line keeps the file order that breaks timestamp ties."""
    for schema, fields in _file_lines(url, bad, REVIEW_FIELDS):
        try:
            yield fields.line, _review(schema, fields)
        except DataError as err:
            bad.report(err)


def items_in(url: str, bad: BadRows) -> Iterator[tuple[int, Item]]:
    """(line, item) for each well-formed metadata row of one file, repeats included (the first one wins later)."""
    for schema, fields in _file_lines(url, bad, META_FIELDS):
        try:
            yield fields.line, _item(schema, fields)
        except DataError as err:
            bad.report(err)


def read_reviews(urls: Inputs, bad: BadRows) -> list[Interaction]:
    """All well-formed reviews of the files in turn, as if concatenated (each keeps its own name and lines)."""
    files = as_files(urls)
    out = [review for url in files for _, review in reviews_in(url, bad)]
    if not out:
        raise DataError(named(files), "no usable review rows")
    return out


def read_meta(urls: Inputs, bad: BadRows) -> tuple[dict[str, Item], int]:
    """Items by id plus the number of repeated ids dropped (2018 dumps repeat rows; the first one wins, across files
    too)."""
    files = as_files(urls)
    items: dict[str, Item] = {}
    repeats = 0
    for url in files:
        for _, item in items_in(url, bad):
            repeats += item.item_id in items
            items.setdefault(item.item_id, item)
    if not items:
        raise DataError(named(files), "no usable metadata rows")
    return items, repeats

"""Hostile input: every malformed line or file is a DataError (or, under skip, a quarantined row), never a crash.

Targeted cases first (non-finite and huge numbers, nesting past the parser's recursion limit, lone surrogates,
corrupted gzip, the bad-fraction limit), then property tests. The fuzzing is exhaustive where it is cheap, at the
row level: every reader, called in process on fuzzed lines and corrupted gzip bytes, under both policies. A few
whole Ray builds (fixed seed) then check that the build agrees with those readers: the same error, naming the same
file, line and field; under skip the same quarantine and every other row read.
"""

from __future__ import annotations

import csv
import gzip
import json
import tempfile
from pathlib import Path

import pytest
from data_fixtures import SMALL, review, write_lines
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from recfound.data.builder import BuildConfig, build
from recfound.data.esci import read_queries
from recfound.data.gritlm import read_gritlm
from recfound.data.sources import BadRows, DataError, read_meta, read_reviews
from recfound.data.synthetic import write_catalogue
from recfound.io import iter_lines

ROW_FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
"""Row level: a fuzzed file is parsed in process in milliseconds."""
BUILD_FUZZ = settings(
    max_examples=3, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
"""Whole builds: seconds each on a local Ray, so a few examples from a fixed seed."""
GRITLM_ROWS = [
    {
        "query": ["Represent the user", "a; b"],
        "pos": [["Represent the item", "c"]],
        "neg": ["e"],
        "task": "Emb_user",
        "id": 1,
    },
    {"text": ["### Instruction:\nPick", "B"], "task": "Sequential_Recommendation", "id": 2},
]


def _expect_bad_line(url: str, reader, *fragments: str) -> None:
    """The error policy names the file and line (and the fragments); skip quarantines that one line."""
    with pytest.raises(DataError) as err:
        reader(url, BadRows())
    for fragment in (url, "line 2", *fragments):
        assert fragment in str(err.value)
    bad = BadRows("skip")
    reader(url, bad)
    assert [(r["file"], r["line"]) for r in bad.rows] == [(url, 2)]


@pytest.mark.parametrize("stamp", ["NaN", "Infinity", "-Infinity", "1e400", "1e300", "9" * 30])
def test_non_finite_or_out_of_range_timestamp(tmp_path, stamp):
    line = json.dumps(review("u9", "i9", 0)).replace('"unixReviewTime": 0', f'"unixReviewTime": {stamp}')
    url = write_lines(tmp_path / "reviews.json", [review("u0", "i0", 1), line, review("u1", "i1", 2)])
    _expect_bad_line(url, read_reviews, "'unixReviewTime'")
    new = {"user_id": "u", "parent_asin": "i", "rating": 4, "timestamp": 0}
    rows = [new, json.dumps(new).replace('"timestamp": 0', f'"timestamp": {stamp}'), new]
    _expect_bad_line(write_lines(tmp_path / "r2023.jsonl", rows), read_reviews, "'timestamp'")


@pytest.mark.parametrize("value", ["NaN", "-Infinity", "1e400"])
def test_non_finite_rating(tmp_path, value):
    line = json.dumps(review("u9", "i9", 0)).replace('"overall": 5.0', f'"overall": {value}')
    url = write_lines(tmp_path / "reviews.json", [review("u0", "i0", 1), line])
    _expect_bad_line(url, read_reviews, "'overall'", "finite")


def test_integer_literal_too_long_to_parse(tmp_path):
    line = json.dumps(review("u9", "i9", 0)).replace('"unixReviewTime": 0', f'"unixReviewTime": {"1" * 5000}')
    _expect_bad_line(write_lines(tmp_path / "reviews.json", [review("u0", "i0", 1), line]), read_reviews)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [100_000, 5000, 990, 900])
def test_deeply_nested_lines(tmp_path, depth):
    first = review("u0", "i0", 1)
    nested = json.dumps({**first, "asin": "@"}).replace('"@"', _deep(depth))
    _expect_bad_line(write_lines(tmp_path / "reviews.json", [first, nested]), read_reviews)
    _expect_bad_line(write_lines(tmp_path / "meta.json", [{"asin": "i0"}, nested]), read_meta)
    query = {"query": "q", "product_id": "p", "esci_label": "E"}
    _expect_bad_line(write_lines(tmp_path / "q.jsonl", [query, _deep(depth)]), read_queries)
    row = GRITLM_ROWS[1]
    gritlm = write_lines(tmp_path / "g.jsonl", [row, json.dumps({**row, "text": "@"}).replace('"@"', _deep(depth))])
    _expect_bad_line(gritlm, lambda url, bad: read_gritlm(url, bad, seed=0, holdout=0.1))


def test_deeply_nested_judgement_list(tmp_path):
    path = tmp_path / "judgements.json"
    path.write_text('{"judgmentRatings": ' + _deep(100_000) + "}")
    with pytest.raises(DataError, match=str(path)):
        read_queries(str(path), BadRows("skip"))


def test_lone_surrogates_are_bad_fields(tmp_path):
    """``"\\ud800"`` parses into a str that cannot be encoded: it would crash the parquet writer or an id hash."""
    first = review("u0", "i0", 1)
    bad = json.dumps({**first, "summary": "\ud800 nice"})
    _expect_bad_line(write_lines(tmp_path / "reviews.json", [first, bad]), read_reviews, "'summary'", "surrogate")
    meta = write_lines(tmp_path / "meta.json", [{"asin": "i0"}, {"asin": "i1", "also_buy": ["i0", "\udc00"]}])
    _expect_bad_line(meta, read_meta, "'also_buy'")
    query = {"query": "q", "product_id": "p", "esci_label": "E"}
    _expect_bad_line(write_lines(tmp_path / "q.jsonl", [query, {**query, "query": "\ud83d"}]), read_queries, "'query'")
    for key, value in (("text", ["\udfff", "B"]), ("id", "\ud800"), ("source", "\ud800")):
        url = write_lines(tmp_path / f"g_{key}.jsonl", [GRITLM_ROWS[1], {**GRITLM_ROWS[1], key: value}])
        _expect_bad_line(url, lambda u, b: read_gritlm(u, b, seed=0, holdout=0.1), repr(key))


def test_gritlm_id_must_be_a_scalar(tmp_path):
    url = write_lines(tmp_path / "g.jsonl", [GRITLM_ROWS[1], {**GRITLM_ROWS[1], "id": [[1]]}])
    _expect_bad_line(url, lambda u, b: read_gritlm(u, b, seed=0, holdout=0.1), "'id'")


def _flip_middle(data: bytes, span: int = 16) -> bytes:
    """Corrupt (not truncate): invert ``span`` bytes in the middle of the deflate stream."""
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + span]) + data[mid + span :]


def test_corrupted_gzip_is_a_data_error(tmp_path):
    text = "".join(json.dumps(review(f"u{i}", "i", i)) + "\n" for i in range(2000))
    reviews = tmp_path / "reviews.json.gz"
    reviews.write_bytes(_flip_middle(gzip.compress(text.encode())))
    for reader in (read_reviews, lambda url, bad: read_gritlm(url, bad, seed=0, holdout=0.1)):
        with pytest.raises(DataError, match=f"{reviews}: cannot read"):
            reader(str(reviews), BadRows("skip"))
    queries = tmp_path / "q.csv.gz"
    rows = "".join(f"query {i},p{i},E\n" for i in range(2000))
    queries.write_bytes(_flip_middle(gzip.compress(("query,product_id,esci_label\n" + rows).encode())))
    with pytest.raises(DataError, match=f"{queries}: cannot read"):
        read_queries(str(queries), BadRows("skip"))


def test_corrupted_parquet_and_csv_header_are_data_errors(tmp_path):
    parquet = tmp_path / "q.parquet"
    parquet.write_bytes(b"PAR1" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match=str(parquet)):
        read_queries(str(parquet), BadRows("skip"))
    header = tmp_path / "q.csv"
    header.write_text('query,"product_id\n' + "x" * 200_000 + "\n")
    with pytest.raises(DataError, match=str(header)):
        read_queries(str(header), BadRows("skip"))


def test_bad_fraction_limit_in_the_reader(tmp_path):
    url = write_lines(tmp_path / "reviews.json", [review("u0", "i0", 1), "{oops", "[]", review("u1", "i1", 2)])
    assert len(read_reviews(url, BadRows("skip", max_fraction=0.5))) == 2
    with pytest.raises(DataError, match=r"2 of 4 rows .*max_bad_fraction=0\.4") as err:
        read_reviews(url, BadRows("skip", max_fraction=0.4))
    assert url in str(err.value)
    with pytest.raises(DataError, match="line 2"):  # the error policy stops at the first bad row, whatever the limit
        read_reviews(url, BadRows("error", max_fraction=1.0))


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, str]:
    """The small synthetic catalogue, queries as JSON lines and a GritLM file, so all four readers get fuzzed."""
    root = tmp_path_factory.mktemp("raw")
    urls = write_catalogue(SMALL, str(root))
    queries = list(csv.DictReader(Path(urls["queries"]).read_text().splitlines()))
    urls["queries"] = write_lines(root / "queries.jsonl", queries)
    urls["gritlm"] = write_lines(root / "gritlm.jsonl", GRITLM_ROWS)
    return urls


@pytest.mark.usefixtures("shared_ray")  # one local Ray for the module's builds (conftest.py)
def test_bad_fraction_limit_stops_the_build_and_keeps_the_quarantine(tmp_path, raw):
    lines = gzip.decompress(Path(raw["reviews"]).read_bytes()).decode().splitlines()
    reviews = write_lines(tmp_path / "reviews.json.gz", ["{broken", *lines, "[]"], compress=True)
    out = tmp_path / "out"
    config = {"out": str(out), "reviews": reviews, "meta": raw["meta"], "on_bad_rows": "skip"}
    with pytest.raises(DataError, match=rf"2 of {len(lines) + 2} rows .* {out}/quarantine.jsonl") as err:
        build(BuildConfig(max_bad_fraction=0.001, **config))
    assert reviews in str(err.value) and not (out / "manifest.json").exists()
    assert [json.loads(r)["line"] for r in (out / "quarantine.jsonl").read_text().splitlines()] == [1, len(lines) + 2]
    assert build(BuildConfig(**config))["quarantined"]["total"] == 2  # the default limit allows 2 in 667
    with pytest.raises(ValidationError, match="max_bad_fraction"):
        BuildConfig(max_bad_fraction=1.5)


# --- property tests: fuzzed lines and corrupted gzip bytes, row level, then a few whole builds --------------------

SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
TEXT = st.text(st.characters() | SURROGATES, max_size=6)
SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | TEXT
JUNK = st.recursive(
    SCALARS, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXT, kids, max_size=3), max_leaves=6
)
DEEP = "\x00deep"  # replaced by nesting deeper than json.dumps could write
READERS = {
    "reviews": read_reviews,
    "meta": read_meta,
    "queries": read_queries,
    "gritlm": lambda url, bad: read_gritlm(url, bad, seed=0, holdout=0.1),
}
"""Every line reader a build uses, in the order a build reads (reviews and meta in Ray read tasks)."""
COUNTED = {"reviews": len, "meta": lambda out: len(out[0]) + out[1]}
"""Records a reader returned, for the readers that keep every good line (meta: items plus repeats)."""


def _render(row: dict, depth: int) -> str:
    return json.dumps(row).replace(json.dumps(DEEP), _deep(depth))


def fuzzed_lines(template: dict) -> st.SearchStrategy[str]:
    """Lines near a valid row (up to two fields replaced by any JSON value, NaN and lone surrogates included, or by
    nesting past the recursion limit; one field dropped), plus JSON that is not an object and text that is not JSON."""
    keys = st.sampled_from(sorted(template))
    row = st.builds(
        lambda new, drop: {k: v for k, v in {**template, **new}.items() if k not in drop},
        st.dictionaries(keys, JUNK | st.just(DEEP), max_size=2),
        st.sets(keys, max_size=1),
    )
    return st.builds(_render, row, st.integers(1, 3000)) | JUNK.map(json.dumps) | st.text(max_size=20)


def _lines(url: str) -> list[str]:
    data = Path(url).read_bytes()
    return (gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode().splitlines()


def _fuzzed_file(data: st.DataObject, url: str, folder: str, min_size: int = 0) -> str:
    """``url``'s lines with up to three fuzzed lines inserted, written under ``folder`` (gzip if it was)."""
    lines = _lines(url)
    template = json.loads(data.draw(st.sampled_from(lines[:3]), label=f"{Path(url).name} template"))
    inserts = st.lists(st.tuples(st.integers(0, len(lines)), fuzzed_lines(template)), min_size=min_size, max_size=3)
    for at, line in data.draw(inserts, label=Path(url).name):
        lines.insert(at, line)
    return write_lines(Path(folder) / Path(url).name, lines, compress=url.endswith(".gz"))


def _corrupted_file(data: st.DataObject, url: str, folder: str) -> str:
    """``url``'s gzip bytes with 1-4 bytes flipped (the small header aimed at too)."""
    whole = bytearray(Path(url).read_bytes())
    position = st.integers(0, 20) | st.integers(0, len(whole) - 1)
    for at, mask in data.draw(st.lists(st.tuples(position, st.integers(1, 255)), min_size=1, max_size=4)):
        whole[at] ^= mask
    corrupted = Path(folder) / Path(url).name
    corrupted.write_bytes(bytes(whole))
    return str(corrupted)


def _read(role: str, url: str, bad: BadRows) -> tuple[object, DataError | None]:
    """A reader's records or its DataError; any other exception fails the test."""
    try:
        return READERS[role](url, bad), None
    except DataError as err:
        return None, err


def _policies_agree(role: str, url: str) -> tuple[object, BadRows, DataError | None, DataError | None]:
    """The row-level property. Under skip every bad row is quarantined, naming this file and a line of it, and the
    others are read; under error the reader stops at the first of them with the same words (file, line, field,
    reason); with none, both policies end alike. Returns skip's records, bad rows and error, and error's error."""
    bad = BadRows("skip")
    out, skipped = _read(role, url, bad)
    _, strict = _read(role, url, BadRows())
    assert all(r["file"] == url for r in bad.rows)
    if bad.rows:
        first = bad.rows[0]
        assert strict is not None and str(strict) == str(DataError(url, first["reason"], first["line"], first["field"]))
    else:
        assert str(strict) == str(skipped)
    if skipped is None and role in COUNTED and not url.endswith(".gz"):  # a corrupted gzip's lines cannot be listed
        numbers = [n for n, _ in iter_lines(url)]
        assert {r["line"] for r in bad.rows} <= set(numbers)
        assert COUNTED[role](out) + len(bad.rows) == len(numbers)
    return out, bad, skipped, strict


@ROW_FUZZ
@given(data=st.data(), role=st.sampled_from(sorted(READERS)))
def test_fuzzed_lines_are_records_or_named_bad_rows(raw, data, role):
    with tempfile.TemporaryDirectory() as tmp:
        _policies_agree(role, _fuzzed_file(data, raw[role], tmp))


@ROW_FUZZ
@given(data=st.data(), role=st.sampled_from(["reviews", "meta"]))
def test_corrupted_gzip_bytes_are_records_or_data_errors(raw, data, role):
    with tempfile.TemporaryDirectory() as tmp:
        _policies_agree(role, _corrupted_file(data, raw[role], tmp))


def _build_agrees_with_readers(urls: dict[str, str], policy: str, folder: str) -> None:
    """The whole-build property: a build (Ray read tasks for reviews and meta) raises the error the readers raise
    first, in its reading order, as a DataError with the same words; under skip, one that finishes quarantines
    the readers' bad rows, in order, and reads every other review."""
    expected, quarantine, reviews = None, [], 0
    for role in READERS:
        out, bad, skipped, strict = _policies_agree(role, urls[role])
        expected = expected or (strict if policy == "error" else skipped)
        quarantine += bad.rows
        reviews = len(out or ()) if role == "reviews" else reviews
    out = Path(folder) / "out"
    try:
        manifest, err = build(BuildConfig(out=str(out), on_bad_rows=policy, max_bad_fraction=1.0, **urls)), None
    except DataError as raised:
        manifest, err = None, raised
    if expected is not None:
        assert type(err) is DataError and str(err) == str(expected)
    elif policy == "skip" and manifest is not None:
        assert [json.loads(r) for r in (out / "quarantine.jsonl").read_text().splitlines()] == quarantine
        assert manifest["filtered"]["reviews_read"] == reviews


@pytest.mark.usefixtures("shared_ray")
@BUILD_FUZZ
@given(data=st.data(), policy=st.sampled_from(["error", "skip"]))
def test_fuzzed_lines_build_as_the_readers_read_them(raw, data, policy):
    with tempfile.TemporaryDirectory() as tmp:
        urls = {role: _fuzzed_file(data, url, tmp, min_size=role in ("reviews", "meta")) for role, url in raw.items()}
        _build_agrees_with_readers(urls, policy, tmp)


@pytest.mark.usefixtures("shared_ray")
@BUILD_FUZZ
@given(data=st.data(), role=st.sampled_from(["reviews", "meta"]), policy=st.sampled_from(["error", "skip"]))
def test_corrupted_gzip_bytes_build_as_the_readers_read_them(raw, data, role, policy):
    with tempfile.TemporaryDirectory() as tmp:
        _build_agrees_with_readers({**raw, role: _corrupted_file(data, raw[role], tmp)}, policy, tmp)

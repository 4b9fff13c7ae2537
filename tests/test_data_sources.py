"""Readers: both Amazon schemas, ESCI in every format, GritLM rows, and every kind of bad input."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import ESCI_JUDGEMENTS, review, write_lines

from recfound.data.esci import Esci, read_queries
from recfound.data.gritlm import read_gritlm
from recfound.data.rows import EmbeddingRow, GenerativeRow
from recfound.data.sources import BadRows, DataError, Interaction, read_meta, read_reviews


def test_2018_and_2023_reviews_normalise_to_the_same_records(tmp_path):
    old = write_lines(tmp_path / "r2018.json.gz", [review("u1", "i1", 1000, 4.0, "nice")], compress=True)
    new = write_lines(
        tmp_path / "r2023.jsonl",
        [
            {
                "user_id": "u1",
                "parent_asin": "i1",
                "asin": "x",
                "rating": 4,
                "timestamp": 1_000_000,
                "title": "nice",
                "text": "nice, really",
            }
        ],
    )
    expected = [Interaction("u1", "i1", 1000, 4.0, "nice", "nice, really")]
    assert read_reviews(old, BadRows()) == expected
    assert read_reviews(new, BadRows()) == expected


def test_meta_dedupes_cleans_html_and_reads_2023(tmp_path):
    url = write_lines(
        tmp_path / "meta.json",
        [
            {
                "asin": "i1",
                "title": '<span class="a-size-medium"',
                "description": ["Fine &amp; good.", ""],
                "category": ["Root", "A &amp; B"],
                "brand": "Acme",
                "also_buy": ["i2"],
                "rank": [],
            },
            {"asin": "i1", "title": "repeat"},
            {"asin": "i2", "title": "Second"},
        ],
    )
    items, repeats = read_meta(url, BadRows())
    assert repeats == 1 and list(items) == ["i1", "i2"]
    assert items["i1"].title == "" and items["i1"].description == "Fine & good."
    assert items["i1"].categories == ("Root", "A & B") and items["i1"].also_buy == ("i2",)
    new = write_lines(
        tmp_path / "meta2023.json",
        [
            {
                "parent_asin": "p1",
                "title": "T",
                "store": "Shop",
                "categories": [],
                "main_category": "Books",
                "features": ["f"],
                "description": [],
            }
        ],
    )
    item = read_meta(new, BadRows())[0]["p1"]
    assert (item.brand, item.categories, item.features) == ("Shop", ("Books",), ("f",))


@pytest.mark.parametrize(
    ("line", "fragments"),
    [
        ('{"reviewerID": "u", "asin": ', ["line 2", "malformed JSON"]),
        ({"reviewerID": "u", "overall": 5.0, "unixReviewTime": 1}, ["line 2", "'asin'", "missing"]),
        ({"reviewerID": "u", "asin": "i", "overall": "abc", "unixReviewTime": 1}, ["line 2", "'overall'", "number"]),
        ({"reviewerID": "u", "asin": "i", "overall": 9.0, "unixReviewTime": 1}, ["line 2", "'overall'", "outside"]),
        ({"reviewerID": "u", "asin": ["i"], "overall": 5.0, "unixReviewTime": 1}, ["line 2", "'asin'", "string"]),
    ],
)
def test_bad_review_line_names_file_line_and_field(tmp_path, line, fragments):
    url = write_lines(tmp_path / "reviews.json", [review("u0", "i0", 1), line, review("u1", "i1", 2)])
    with pytest.raises(DataError) as err:
        read_reviews(url, BadRows())
    assert url in str(err.value)
    for fragment in fragments:
        assert fragment in str(err.value)
    bad = BadRows("skip")
    assert [r.user for r in read_reviews(url, bad)] == ["u0", "u1"]
    assert bad.counts() == {url: 1} and bad.rows[0]["line"] == 2


def test_empty_or_unreadable_files_are_errors(tmp_path):
    empty = tmp_path / "empty.json.gz"
    write_lines(empty, [], compress=True)
    for reader in (read_reviews, read_meta, read_queries):
        with pytest.raises(DataError, match="empty file"):
            reader(str(empty), BadRows("skip"))
    truncated = tmp_path / "truncated.json.gz"
    whole = gzip.compress("".join(json.dumps(review(f"u{i}", "i", i)) + "\n" for i in range(2000)).encode())
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=f"{truncated}: cannot read past line"):
        read_reviews(str(truncated), BadRows())
    only_bad = write_lines(tmp_path / "bad.json", ["{oops"])
    with pytest.raises(DataError, match="no usable review rows"):
        read_reviews(only_bad, BadRows("skip"))


def test_esci_formats_agree(tmp_path):
    rows = [
        {"query": "Red Shoes", "product_id": "p1", "esci_label": "E", "product_title": "Red Shoe"},
        {"query": "red shoes", "product_id": "p2", "esci_label": "irrelevant", "product_title": ""},
    ]
    csv_path = tmp_path / "q.csv"
    csv_path.write_text(
        "query,product_id,esci_label,product_title\n"
        + "".join(f"{r['query']},{r['product_id']},{r['esci_label']},{r['product_title']}\n" for r in rows)
    )
    parquet_path = tmp_path / "q.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet_path)
    jsonl = write_lines(tmp_path / "q.jsonl", rows)
    results = [read_queries(str(p), BadRows()) for p in (csv_path, parquet_path, jsonl)]
    assert results[0] == results[1] == results[2]
    assert [(j.query, j.label, j.title) for j in results[0]] == [
        ("red shoes", Esci.EXACT, "Red Shoe"),
        ("red shoes", Esci.IRRELEVANT, ""),
    ]


def test_bad_esci_rows(tmp_path):
    csv_path = tmp_path / "q.csv"
    csv_path.write_text("query,product_id,esci_label\nshoes,p1,E\nshoes,p2,X\n")
    with pytest.raises(DataError, match=r"line 3: field 'esci_label'"):
        read_queries(str(csv_path), BadRows())
    parquet_path = tmp_path / "q.parquet"
    pq.write_table(pa.Table.from_pylist([{"query": "shoes", "product_id": "p1"}]), parquet_path)
    with pytest.raises(DataError, match="missing required column"):
        read_queries(str(parquet_path), BadRows())


@pytest.mark.skipif(not ESCI_JUDGEMENTS.exists(), reason=f"real ESCI slice not found at {ESCI_JUDGEMENTS}")
def test_real_esci_judgement_list():
    judgements = read_queries(str(ESCI_JUDGEMENTS), BadRows())
    assert len(judgements) == 3375 and len({j.query for j in judgements}) == 75
    assert {j.label for j in judgements} == set(Esci)
    assert all(not j.title for j in judgements)  # the slice has no product text


def test_gritlm_rows_map_to_our_tasks(tmp_path):
    url = write_lines(
        tmp_path / "train.jsonl",
        [
            {
                "query": ["Represent the user", "a; b"],
                "pos": [["Represent the item", "c"], ["Represent the item", "d"]],
                "neg": [["Represent the item", "e"]],
                "task": "Emb_user",
                "id": 1,
            },
            {"text": ["### Instruction:\nPick", "B"], "task": "Sequential_Recommendation", "id": 2},
            {"query": "q", "pos": ["p"], "task": "q2i", "id": 3},
        ],
    )
    rows = read_gritlm(str(tmp_path / "{split}.jsonl"), BadRows(), seed=0, holdout=0.1)
    assert sorted(rows) == ["q2i", "sequential_recommendation", "u2i"]
    u2i = [r for _, r in rows["u2i"]]
    assert all(split == "train" for samples in rows.values() for split, _ in samples)
    assert [r.pos for r in u2i] == ["c", "d"] and all(isinstance(r, EmbeddingRow) for r in u2i)
    assert u2i[0].neg == ("e",) and u2i[0].query_instruction == "Represent the user"
    assert rows["sequential_recommendation"][0][1] == GenerativeRow("### Instruction:\nPick", "B", source="gritlm")
    assert read_gritlm(url, BadRows(), seed=0, holdout=0.1).keys() == rows.keys()


def test_gritlm_unknown_task_is_an_error(tmp_path):
    url = write_lines(
        tmp_path / "g.jsonl", [{"text": ["p", "r"], "task": "Emb_user"}, {"text": ["p", "r"], "task": "Movie_Trivia"}]
    )
    with pytest.raises(DataError, match=r"line 1: field 'query'"):
        read_gritlm(url, BadRows(), seed=0, holdout=0.1)
    bad = BadRows("skip")
    assert read_gritlm(url, bad, seed=0, holdout=0.1) == {}
    assert "unknown task 'Movie_Trivia'" in bad.rows[1]["reason"] and bad.rows[1]["field"] == "task"

"""The task builder on the synthetic catalogue: contract, determinism, leakage, filesystems, policies."""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import (
    SMALL,
    assert_no_leakage,
    in_memory_interactions,
    ray_seeing_memory,
    read_task,
    small_build,
    write_lines,
)

from recfound.data.builder import BuildConfig, build
from recfound.data.sources import DataError
from recfound.data.synthetic import write_catalogue
from recfound.data.templates import TEMPLATE_VERSION, history_text, ranking_input, with_candidate
from recfound.io import sha256
from recfound.tasks import (
    ALL_TASKS,
    EMBEDDING_COLUMNS,
    EMBEDDING_TASKS,
    GENERATIVE_COLUMNS,
    INTERACTION_COLUMNS,
    ITEM_COLUMNS,
    SPLITS,
)

pytestmark = pytest.mark.usefixtures("shared_ray")  # one local Ray for the module's builds (conftest.py)

QA = {"answerability_prediction", "answer_generation"}


@pytest.fixture(scope="module")
def default_build(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, build(BuildConfig(out=str(out)))


def test_default_build_has_every_supported_task_with_contract_columns(default_build):
    out, manifest = default_build
    assert set(manifest["tasks"]) == set(ALL_TASKS) - QA
    assert set(manifest["skipped_tasks"]) == QA and all(manifest["skipped_tasks"].values())
    for task, counts in manifest["tasks"].items():
        assert all(counts[split] > 0 for split in SPLITS), (task, counts)
        for split in SPLITS:
            table = pq.read_table(out / "tasks" / task / f"{split}.parquet")
            columns = EMBEDDING_COLUMNS if task in EMBEDDING_TASKS else GENERATIVE_COLUMNS
            assert tuple(table.column_names) == columns and table.num_rows == counts[split]
            assert set(table.column("task").to_pylist()) == {task}
            if task in EMBEDDING_TASKS:
                assert table.schema.field("neg").type == pa.list_(pa.string())
                assert all(len(n) == 1 for n in table.column("neg_items").to_pylist())  # num_negatives=1
    assert tuple(pq.read_schema(out / "items.parquet").names) == ITEM_COLUMNS
    assert tuple(pq.read_schema(out / "interactions.parquet").names) == INTERACTION_COLUMNS
    ids = [
        i
        for t in manifest["tasks"]
        for s in SPLITS
        for i in pq.read_table(out / "tasks" / t / f"{s}.parquet", columns=["id"]).column("id").to_pylist()
    ]
    assert len(ids) == len(set(ids))


def test_the_pipeline_keeps_the_interactions_the_in_memory_builder_kept(default_build):
    out, manifest = default_build
    rows = pq.read_table(out / "interactions.parquet").to_pylist()
    built = {(r["user"], r["item"], r["timestamp"], r["split"]) for r in rows}
    assert len(built) == len(rows) == manifest["interactions"]
    raw = out / "raw"
    expected = in_memory_interactions(str(raw / "reviews_Synthetic_5.json.gz"), str(raw / "meta_Synthetic.json.gz"), 5)
    assert manifest["config"]["kcore"] == 5 and built == expected


def test_manifest_records_provenance(default_build):
    out, manifest = default_build
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["template_version"] == TEMPLATE_VERSION and manifest["seed"] == 0 and manifest["synthetic"]
    assert {s["role"] for s in manifest["sources"]} == {"reviews", "meta", "queries"}
    assert all(s["sha256"] == sha256(s["url"]) for s in manifest["sources"])
    assert manifest["q2i"]["pseudo_queries"] is False
    assert manifest["quarantined"]["total"] == 0 and manifest["config"]["kcore"] == 5
    assert manifest["filtered"]["duplicate_meta_rows"] == 1 and manifest["filtered"]["items_without_meta"] > 0


def test_items_without_metadata_still_have_text(default_build):
    out, manifest = default_build
    items = pq.read_table(out / "items.parquet").to_pylist()
    assert all(i["title"] and i["text"].startswith("Title: ") for i in items)
    bare = [
        i for i in items if not i["brand"]
    ]  # synthetic items all have a brand, unless their metadata row is missing
    assert len(bare) == manifest["filtered"]["items_without_meta"]
    assert all(i["title"] != i["item_id"] for i in bare)  # titled by a training review's summary


def test_no_test_target_leaks_into_the_users_training_rows(default_build):
    assert_no_leakage(default_build[0])


def test_explanations_are_the_reviewers_reasons_for_liked_items(default_build):
    """The response is the review's title (or first sentence) of a 4-5 star review, never a bare star rating; the
    prompt shows the user's earlier items only and names the reviewed product."""
    out, _ = default_build
    reviews = {
        (r["reviewerID"], r["asin"]): r
        for r in map(json.loads, gzip.open(out / "raw" / "reviews_Synthetic_5.json.gz", "rt"))
    }
    title = {i["item_id"]: i["title"] for i in pq.read_table(out / "items.parquet").to_pylist()}
    rows = [r for split in SPLITS for r in read_task(out, "explanation_generation", split)]
    assert rows
    for row in rows:
        review = reviews[(row["user"], row["item"])]
        assert review["overall"] >= 4 and row["response"] in (
            review["summary"],
            review["reviewText"].split(". ")[0] + ".",
        )
        assert 3 <= len(row["response"].split()) <= 40 and not re.fullmatch(r"(?i)\w+ stars?", row["response"])
        assert f"Product: {title[row['item']]}" in row["prompt"]
    assert_no_leakage(out)


def test_candidate_ranking_asks_about_the_next_item_or_a_sampled_unbought_one(default_build):
    """Per interaction after a user's first: a "yes" row whose candidate is that item and a "no" row whose candidate
    was never bought by the user, both with the same instruction and history (the items before it, most recent
    max_history) and the target's split; 1:1, so "yes" is not the majority answer."""
    out, manifest = default_build
    title = {i["item_id"]: i["title"] for i in pq.read_table(out / "items.parquet").to_pylist()}
    timeline: dict[str, list[dict]] = {}
    for event in pq.read_table(out / "interactions.parquet").to_pylist():  # in each user's timeline order
        timeline.setdefault(event["user"], []).append(event)
    max_history = manifest["config"]["max_history"]
    positives = 0
    for split in SPLITS:
        rows = read_task(out, "candidate_ranking", split)
        assert [r["response"] for r in rows] == ["yes", "no"] * (len(rows) // 2) and rows
        for pos, neg in zip(rows[::2], rows[1::2], strict=True):
            events = timeline[pos["user"]]
            t = [e["item"] for e in events].index(pos["item"])
            assert t >= 1 and events[t]["split"] == split and neg["user"] == pos["user"]
            assert neg["item"] not in {e["item"] for e in events}
            past = history_text([title[e["item"]] for e in events[max(0, t - max_history) : t]])
            assert ranking_input(pos["prompt"])["history"] == ranking_input(neg["prompt"])["history"] == past
            for row in (pos, neg):
                assert ranking_input(row["prompt"])["title"] == title[row["item"]]
            assert with_candidate(neg["prompt"], title[pos["item"]]) == pos["prompt"]  # same instruction too
            positives += 1
    assert positives == sum(len(events) - 1 for events in timeline.values())
    assert_no_leakage(out)
    with pytest.raises(ValueError, match="not a candidate_ranking prompt"):
        with_candidate("### Instruction:\nhi\n\n### Response:", "a title")


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = (small_build(tmp_path / name, seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert a["tasks"] == b["tasks"]
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert (tmp_path / "a/raw/reviews_Synthetic_5.json.gz").read_bytes() == (
        tmp_path / "b/raw/reviews_Synthetic_5.json.gz"
    ).read_bytes()
    other = _files(tmp_path / "c")
    assert other.keys() == _files(tmp_path / "a").keys() and other != _files(tmp_path / "a")


@pytest.mark.slow  # starts a second local Ray whose workers see the memory:// files: not in `make test-fast`
def test_memory_filesystem_build_matches_local(tmp_path):
    raw = write_catalogue(SMALL, "memory://recfound-test/raw")
    try:
        local = {}
        for key, url in raw.items():
            local[key] = str(tmp_path / url.rsplit("/", 1)[1])
            Path(local[key]).write_bytes(fsspec.open(url, "rb").open().read())
        with ray_seeing_memory("/recfound-test/raw"):
            build(BuildConfig(out="memory://recfound-test/out", **raw))
            build(BuildConfig(out=str(tmp_path / "out"), **local))
        fs = fsspec.filesystem("memory")
        manifest = json.loads(fs.cat("/recfound-test/out/manifest.json"))
        assert [s["url"] for s in manifest["sources"]] == list(raw.values())
        for path in sorted((tmp_path / "out").rglob("*.parquet")):
            assert fs.cat(f"/recfound-test/out/{path.relative_to(tmp_path / 'out')}") == path.read_bytes(), path
    finally:
        fsspec.filesystem("memory").rm("/recfound-test", recursive=True)


def test_q2i_hard_negatives_come_from_the_judgements(default_build):
    out, manifest = default_build
    queries = next(s["url"] for s in manifest["sources"] if s["role"] == "queries")
    judged: dict[str, set[str]] = {}
    for row in csv.DictReader(Path(queries).read_text().splitlines()):
        if row["esci_label"] != "E":
            judged.setdefault(row["query"], set()).add(row["product_id"])
    rows = read_task(out, "q2i", "train")
    assert all(r["source"] == "esci" and r["neg_items"][0] in judged[r["query"]] for r in rows)


def test_task_selection_caps_and_negatives(tmp_path):
    manifest = small_build(tmp_path / "some", tasks="u2i, sentiment_analysis", max_rows_per_task=5, num_negatives=3)
    assert set(manifest["tasks"]) == {"u2i", "sentiment_analysis"} and manifest["skipped_tasks"] == {}
    assert all(n <= 5 for counts in manifest["tasks"].values() for n in counts.values())
    for row in read_task(tmp_path / "some", "u2i", "train"):
        assert len(set(row["neg_items"])) == 3 and row["pos_item"] not in row["neg_items"]
    with pytest.raises(DataError, match="unknown task 'u2x'"):
        small_build(tmp_path / "bad", tasks=["u2i", "u2x"])
    no_queries = SMALL.model_copy(update={"queries": 0})
    with pytest.raises(DataError, match="'query_rewriting' was requested but cannot be built: needs ESCI"):
        build(BuildConfig(out=str(tmp_path / "qr"), synthetic=no_queries, tasks=["query_rewriting"]))
    manifest = build(BuildConfig(out=str(tmp_path / "pseudo"), synthetic=no_queries))
    assert manifest["q2i"]["pseudo_queries"] is True and "query_rewriting" in manifest["skipped_tasks"]
    assert manifest["tasks"]["q2i"]["train"] > 0


def test_reviews_without_metadata(tmp_path):
    raw = write_catalogue(SMALL, str(tmp_path / "raw"))
    manifest = build(BuildConfig(out=str(tmp_path / "out"), reviews=raw["reviews"]))
    for task in ("product_relation_prediction", "attribute_value_extraction", "product_matching", "item_profile"):
        assert "needs item metadata" in manifest["skipped_tasks"][task]
    assert {"u2i", "q2i", "i2i", "sequential_recommendation", "user_profile"} <= set(manifest["tasks"])
    items = pq.read_table(tmp_path / "out" / "items.parquet").to_pylist()
    assert all(i["title"] for i in items) and all(i["category"] == "" for i in items)


def test_skip_policy_quarantines_bad_rows(tmp_path):
    raw = write_catalogue(SMALL, str(tmp_path / "raw"))
    lines = gzip.decompress(Path(raw["reviews"]).read_bytes()).decode().splitlines()
    lines[4] = lines[4].replace('"overall": ', '"overall": "abc", "x": ')
    lines.insert(7, "{broken")
    raw["reviews"] = write_lines(tmp_path / "reviews.json.gz", lines, compress=True)
    with pytest.raises(DataError, match=re.escape(f"{raw['reviews']} line 5: field 'overall'")):
        build(BuildConfig(out=str(tmp_path / "strict"), **raw))
    assert not (tmp_path / "strict" / "manifest.json").exists()
    manifest = build(BuildConfig(out=str(tmp_path / "out"), on_bad_rows="skip", **raw))
    assert manifest["quarantined"]["total"] == 2 and manifest["quarantined"]["by_file"] == {raw["reviews"]: 2}
    quarantined = [json.loads(line) for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["line"], q["field"]) for q in quarantined] == [(5, "overall"), (8, None)]
    assert all(q["file"] == raw["reviews"] and q["reason"] for q in quarantined)


def test_gritlm_only_build(tmp_path):
    url = write_lines(
        tmp_path / "recfound.jsonl",
        [
            {
                "query": ["Represent the user", f"history {i}"],
                "pos": [["Represent the item", f"item {i}"]],
                "neg": [["Represent the item", "other"]],
                "task": "Emb_user",
                "id": i,
            }
            for i in range(20)
        ]
        + [
            {"text": [f"Is this answerable? {i}", "yes"], "task": "Answerability_Prediction", "id": 100 + i}
            for i in range(20)
        ],
    )
    manifest = build(BuildConfig(out=str(tmp_path / "out"), gritlm=url))
    assert set(manifest["tasks"]) == {"u2i", "answerability_prediction"}
    assert sum(manifest["tasks"]["u2i"].values()) == 20 and manifest["interactions"] == 0
    items = pq.read_table(tmp_path / "out" / "items.parquet").to_pylist()
    assert {i["text"] for i in items} == {f"item {i}" for i in range(20)} | {"other"}
    assert "no reviews given" in manifest["skipped_tasks"]["i2i"]


def test_users_are_templated_in_chunks_of_whole_users_and_other_tasks_one_at_a_time(tmp_path, monkeypatch):
    """The per-user tasks are templated by Ray tasks, a chunk of whole users each, written back in user order; the
    driver then builds and writes one other task's rows at a time: their sum grows with the dump (issue 16)."""
    from recfound.data import builder, chunks, tables, user_rows

    events: list[tuple] = []
    templated = builder.templated

    def recorded(ctx, blocks, tasks):
        for chunk in templated(ctx, blocks, tasks):
            events.append(("chunk", Counter(chunk[0].column("user").to_pylist()), set(chunk[1])))
            yield chunk

    monkeypatch.setattr(builder, "templated", recorded)
    monkeypatch.setattr(chunks, "CHUNK_ROWS", 16)
    for task, make in list(builder.BUILDERS.items()):
        monkeypatch.setitem(builder.BUILDERS, task, lambda ctx, t=task, f=make: events.append(("build", t)) or f(ctx))
    close = tables.TaskFiles.close
    monkeypatch.setattr(tables.TaskFiles, "close", lambda self: events.append(("close", self.task)) or close(self))
    manifest = small_build(tmp_path)

    parts = [e[1] for e in events if e[0] == "chunk"]
    assert len(parts) > 3 and all(sum(c.values()) >= 16 for c in parts[:-1])
    users = [user for part in parts for user in part]
    assert users == sorted(set(users)) and len(users) == manifest["users"]  # each user in one chunk, in order
    interactions = pq.read_table(tmp_path / "interactions.parquet", columns=["user"]).column("user").to_pylist()
    assert sum(parts, Counter()) == Counter(interactions)  # each timeline whole
    assert events[0][0] == "chunk" and events[0][2] == set(user_rows.USER_BUILDERS)  # every per-user task, first
    built = [t for kind, t, *_ in events if kind == "build" and t in manifest["tasks"]]
    assert built == [t for t in manifest["tasks"] if t in builder.BUILDERS]
    for task, following in zip(built, built[1:]):
        assert events.index(("close", task)) < events.index(("build", following)), (task, following, events)


def _rows(out: Path, task: str, split: str) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "id"} for row in read_task(out, task, split)]


def test_rows_are_written_in_row_groups_as_they_are_made(tmp_path, monkeypatch):
    """With a small row-group budget (and templating chunks) every file is written in pieces during the pass, and
    reads back the same."""
    from recfound.data import chunks, tables

    whole = small_build(tmp_path / "whole")
    monkeypatch.setattr(tables, "ROW_GROUP_BYTES", 2_000)
    monkeypatch.setattr(chunks, "CHUNK_ROWS", 16)
    pieces = small_build(tmp_path / "pieces")
    assert pieces["tasks"] == whole["tasks"]
    assert pq.ParquetFile(tmp_path / "pieces" / "tasks" / "u2i" / "train.parquet").num_row_groups > 1
    assert pq.ParquetFile(tmp_path / "pieces" / "interactions.parquet").num_row_groups > 1
    for path in sorted((tmp_path / "whole").rglob("*.parquet")):
        twin = tmp_path / "pieces" / path.relative_to(tmp_path / "whole")
        assert pq.read_table(path).to_pylist() == pq.read_table(twin).to_pylist(), path


def test_a_cap_keeps_a_seeded_sample_of_each_split_in_order(tmp_path):
    full = small_build(tmp_path / "full", tasks="u2i,user_profile")
    capped = small_build(tmp_path / "capped", tasks="u2i,user_profile", max_rows_per_task=7)
    for task in ("u2i", "user_profile"):
        for split in SPLITS:
            rows, kept = _rows(tmp_path / "full", task, split), _rows(tmp_path / "capped", task, split)
            assert len(kept) == capped["tasks"][task][split] == min(7, full["tasks"][task][split])
            positions = [rows.index(row) for row in kept]
            assert positions == sorted(positions)  # a sample in the full split's order
            ids = [r["id"] for r in read_task(tmp_path / "capped", task, split)]
            assert ids == [f"{task}-{split}-{i:07d}" for i in range(len(kept))]
    assert not list((tmp_path / "capped").rglob("*.uncapped"))
    small_build(tmp_path / "again", tasks="u2i,user_profile", max_rows_per_task=7)
    assert _files(tmp_path / "again") == _files(tmp_path / "capped")


def test_the_workers_template_from_the_item_fields_templates_read(tmp_path, monkeypatch):
    """Every templating worker holds its own copy of the catalogue, so the item fields no per-user template reads
    are blanked in it (``user_rows.UNREAD``): the rows must be those the whole catalogue gives. The synthetic
    catalogue fills every blanked field, so a template that came to read one would change its rows here."""
    from recfound.data import user_rows

    unread = set(user_rows.UNREAD)
    small_build(tmp_path / "blanked")
    monkeypatch.setattr(user_rows, "UNREAD", {})
    small_build(tmp_path / "whole")
    meta = [json.loads(line) for line in gzip.open(next((tmp_path / "whole" / "raw").rglob("meta*")), "rt")]
    filled = {"categories": "category", "description": "description", "features": "feature"}
    filled |= {"also_buy": "also_buy", "also_view": "also_view"}
    assert unread == set(filled) and all(any(m.get(key) for m in meta) for key in filled.values())
    files = {
        name: {p.relative_to(tmp_path / name): p.read_bytes() for p in (tmp_path / name).rglob("*.parquet")}
        for name in ("blanked", "whole")
    }
    assert files["blanked"] and files["blanked"] == files["whole"]


@pytest.mark.parametrize("limit", [None, 1])
def test_task_files_keep_the_text_of_items_the_catalogue_lacks_only(tmp_path, limit):
    """Every item the per-user rows name is a catalogue item, whose text items.parquet takes from the catalogue:
    a copy per task of every such text grew the driver with the catalogue (issue 16). Only items the catalogue
    lacks (GritLM rows name items by their text alone) keep theirs, whether rows come as tables or one by one."""
    from recfound.data.rows import EmbeddingRow
    from recfound.data.tables import TaskFiles, row_columns

    def row(pos: str, neg: str) -> EmbeddingRow:
        return EmbeddingRow("q:", "query", "d:", f"text of {pos}", pos, (f"text of {neg}",), (neg,))

    files = TaskFiles(str(tmp_path), "u2i", limit, seed=0, known={"a", "b"})
    files.add("train", row("a", "x"))
    files.add_table("train", pa.Table.from_pylist([row_columns("u2i", row("b", "y"))]))
    assert files.close()["train"] == (limit or 2)
    assert set(files.texts) <= {"x", "y"} and len(files.texts) == (limit or 2)  # a cap notes the kept rows only
    assert all(text == f"text of {item}" for item, text in files.texts.items())

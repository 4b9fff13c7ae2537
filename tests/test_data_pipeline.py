"""The builder's Ray Data stages on a hand-made input whose result is worked out by hand: de-duplication, iterated
k-core, the per-user split with time ties broken by input order (file, then line), across files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from data_fixtures import review, small_build, write_lines

from recfound.data.behaviour import gather
from recfound.data.builder import BuildConfig, build
from recfound.data.catalogue import CatalogueItem
from recfound.data.chunks import user_chunks
from recfound.data.context import Context
from recfound.data.embedding_tasks import related_pairs
from recfound.data.sources import DataError, Interaction
from recfound.data.split import leave_last_out, user_timelines

pytestmark = pytest.mark.usefixtures("shared_ray")  # one local Ray for the module's builds (conftest.py)

FIRST = [
    review("u1", "i1", 1),
    review("u1", "i2", 2),
    review("u1", "i3", 3),
    review("u2", "i1", 1),
    review("u2", "i3", 5),  # ties with u2's i2 in the second file: this one is earlier
    review("u3", "i1", 4),  # u3 has one review: dropped by the 2-core
    review("u1", "i1", 9),  # a repeat: the first one stays
]
SECOND = [
    review("u2", "i2", 5),
    review("u4", "i4", 2),  # u4 dropped, which leaves i4 with one user: dropped in the next pass
    review("u2", "i4", 6),
]
EXPECTED = {  # (user, item, timestamp, split): each user's last event is test, the one before valid
    ("u1", "i1", 1, "train"),
    ("u1", "i2", 2, "valid"),
    ("u1", "i3", 3, "test"),
    ("u2", "i1", 1, "train"),
    ("u2", "i3", 5, "valid"),
    ("u2", "i2", 5, "test"),  # same second as i3, later in the input: a name order would put it first
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tiny")
    first = write_lines(root / "a.json", FIRST)
    second = write_lines(root / "b.json.gz", SECOND, compress=True)
    return f"{second},{first}"  # a comma list, read in sorted order: a.json first


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory, tiny) -> tuple[Path, dict]:
    """The hand-made input built once, for the expected rows and as the first of the two determinism builds."""
    out = tmp_path_factory.mktemp("tiny-build")
    return out, build(BuildConfig(out=str(out), reviews=tiny, kcore=2))


def _interactions(out) -> set[tuple]:
    rows = pq.read_table(out / "interactions.parquet").to_pylist()
    return {(r["user"], r["item"], r["timestamp"], r["split"]) for r in rows}


def test_dedupe_kcore_and_split_give_the_rows_worked_out_by_hand(tiny_build):
    out, manifest = tiny_build
    assert _interactions(out) == EXPECTED
    assert manifest["filtered"]["reviews_read"] == 10
    assert manifest["filtered"]["duplicate_interactions"] == 1
    assert manifest["filtered"]["kcore_removed_interactions"] == 3
    assert manifest["users"] == 2 and manifest["interactions"] == 6


def test_two_builds_write_the_same_bytes(tmp_path, tiny, tiny_build):
    a, _ = tiny_build
    build(BuildConfig(out=str(tmp_path / "b"), reviews=tiny, kcore=2))
    files = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
    assert files and files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.parquet"))
    assert all((a / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_a_bad_line_in_a_read_task_reaches_the_caller_as_a_data_error(tmp_path, tiny):
    """Raised in a Ray worker, it arrives as the DataError itself (file, line and field; no worker traceback), and
    under skip it is the only row lost."""
    broken = write_lines(tmp_path / "c.json", [review("u1", "i2", 7), {**review("u1", "i1", 1), "overall": "x"}])
    with pytest.raises(DataError) as err:
        build(BuildConfig(out=str(tmp_path / "strict"), reviews=f"{tiny},{broken}", kcore=2))
    assert type(err.value) is DataError and str(err.value).startswith(f"{broken} line 2: field 'overall'")
    manifest = build(
        BuildConfig(
            out=str(tmp_path / "skip"), reviews=f"{tiny},{broken}", kcore=2, on_bad_rows="skip", max_bad_fraction=1
        )
    )
    assert manifest["quarantined"]["by_file"] == {broken: 1} and manifest["filtered"]["reviews_read"] == 11
    quarantined = [json.loads(r) for r in (tmp_path / "skip" / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["file"], q["line"], q["field"]) for q in quarantined] == [(broken, 2, "overall")]


def _events(*rows: tuple[str, str, int]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {"user": u, "item": i, "timestamp": t, "rating": 5.0, "summary": "", "text": "", "file_index": 0, "line": n}
            for n, (u, i, t) in enumerate(rows)
        ]
    )


def test_user_timelines_join_a_user_across_batches_and_reject_users_out_of_order():
    batches = [_events(("a", "i2", 2), ("a", "i1", 1)), _events(("a", "i3", 3), ("b", "i1", 1), ("b", "i2", 2))]
    timelines = list(user_timelines(batches))
    assert [(u, [(s, e.item) for s, e in t]) for u, t in timelines] == [
        ("a", [("train", "i1"), ("valid", "i2"), ("test", "i3")]),
        ("b", [("valid", "i1"), ("test", "i2")]),
    ]
    with pytest.raises(RuntimeError, match="out of user order"):
        list(user_timelines([_events(("b", "i1", 1), ("a", "i1", 1))]))
    with pytest.raises(RuntimeError, match="out of user order"):  # a user met again after another one
        list(user_timelines([_events(("a", "i1", 1), ("b", "i1", 1)), _events(("a", "i2", 2))]))


def test_user_chunks_cut_whole_users_across_blocks_in_order():
    """Chunks for the templating tasks: whole users (one spans three blocks), at least ``rows`` rows but the last,
    together the input in order; a block that starts before the last user seen is refused."""
    users = ["a"] * 2 + ["b"] * 7 + ["c"] + ["d"] * 3 + ["e"]
    rows = [(u, f"i{n}", n) for n, u in enumerate(users)]
    blocks = [_events(*rows[:4]), _events(*rows[4:6]), _events(*rows[6:11]), _events(), _events(*rows[11:])]
    chunks = list(user_chunks(blocks, 3))
    assert [c.column("user").to_pylist() for c in chunks] == [users[:9], users[9:13], users[13:]]
    assert pa.concat_tables(chunks).column("item").to_pylist() == [i for _, i, _ in rows]
    assert [len(c) for c in user_chunks(blocks, 100)] == [len(users)]
    with pytest.raises(RuntimeError, match="out of user order"):
        list(user_chunks([_events(("b", "i1", 1)), _events(("a", "i1", 1))], 1))


def test_each_task_is_sent_its_chunk_only_not_the_block_it_was_cut_from(monkeypatch):
    """A slice pickles its parent's whole buffers: uncopied, every task of a 250k-row block would be sent all of it."""
    from recfound.data import chunks

    class Task:
        sent: list[int] = []

        @classmethod
        def remote(cls, chunk: pa.Table) -> ray.ObjectRef:
            cls.sent.append(len(pickle.dumps(chunk, protocol=5)))
            return ray.put(chunk.num_rows)

    block = _events(*[(f"u{n // 4:04d}", f"i{n}", n) for n in range(4000)])
    monkeypatch.setattr(chunks, "CHUNK_ROWS", 400)
    assert sum(chunks.in_order(Task, [block])) == 4000
    whole = len(pickle.dumps(block, protocol=5))
    assert len(Task.sent) == 10 and max(Task.sent) < whole / 5, (Task.sent, whole)


def test_rows_are_the_same_whatever_the_chunk_size(tmp_path, monkeypatch):
    """Many small templating tasks in flight at once give the rows, ids and files of one big task: rows depend on
    (seed, user, position), and results are written in input order."""
    from recfound.data import chunks

    whole = small_build(tmp_path / "whole")
    monkeypatch.setattr(chunks, "CHUNK_ROWS", 4)
    chunked = small_build(tmp_path / "chunked")
    assert chunked["tasks"] == whole["tasks"]
    for path in sorted((tmp_path / "whole").rglob("*.parquet")):
        twin = tmp_path / "chunked" / path.relative_to(tmp_path / "whole")
        assert pq.read_table(twin).to_pylist() == pq.read_table(path).to_pylist(), path


def test_behaviour_keeps_cross_user_facts_from_training_events_only():
    def timeline(user: str, *events: tuple[str, int]) -> tuple[str, list]:
        interactions = [Interaction(user, i, t, 5.0, f"{user}:{i}", f"text {user}:{i}") for i, t in events]
        return user, leave_last_out(interactions)

    a = timeline("a", ("i5", 4), ("i1", 5), ("i2", 6), ("i3", 7), ("i4", 8))  # i3 valid, i4 test
    b = timeline("b", ("i1", 5), ("i3", 6), ("i2", 9))  # i3 valid, i2 test
    behaviour = gather([a, b], quoted={"i1", "i2"})
    assert (behaviour.users, behaviour.interactions) == (2, 8)
    assert behaviour.items == {"i1", "i2", "i3", "i4", "i5"}
    # i1's earliest training summary: a tie at t=5, won by the first user in order; held-out reviews never title
    assert behaviour.summaries() == {"i5": ["a:i5"], "i1": ["a:i1"], "i2": ["a:i2"]}
    assert behaviour.reviews_of("i1") == ["text a:i1", "text b:i1"]
    assert behaviour.reviews_of("i2") == ["text a:i2"]  # b's review of i2 is its test event
    assert behaviour.reviews_of("i5") == []  # a training review, but no question quotes i5
    pairs = behaviour.next_item_pairs()  # b's i1 -> i3 crosses into valid
    assert list(zip(pairs["earlier"].to_pylist(), pairs["later"].to_pylist())) == [("i1", "i2"), ("i5", "i1")]


def test_related_pairs_keep_each_pair_once_with_its_first_relation_sorted_by_anchor_then_item():
    """i2i's pairs: the metadata's also_buy, then also_view, then consecutive training purchases; a pair met again
    keeps the first of these, and the table is sorted by (anchor, other) as strings sort (ids of unequal length)."""
    items = {
        "i1": CatalogueItem("i1", "t1", "t1", "c", also_buy=("i2",), also_view=("i2", "i10")),
        "i10": CatalogueItem("i10", "t10", "t10", "c", also_view=("i1",)),
        "i2": CatalogueItem("i2", "t2", "t2", "c", also_buy=("i1",)),
        "i9": CatalogueItem("i9", "t9", "t9", "c"),
    }
    events = [Interaction("u", i, t, 5.0, "", "") for t, i in enumerate(["i9", "i1", "i10", "i2", "i9", "i1"])]
    behaviour = gather([("u", leave_last_out(events))])  # trains i9 -> i1 -> i10 -> i2 (then valid, test)
    pairs = related_pairs(Context(seed=0, catalogue=items, behaviour=behaviour))
    assert pairs.to_pylist() == [
        {"anchor": "i1", "other": "i10", "relation": "also_view"},  # also a purchase: the listing wins
        {"anchor": "i1", "other": "i2", "relation": "also_buy"},  # also viewed: also_buy wins
        {"anchor": "i10", "other": "i1", "relation": "also_view"},
        {"anchor": "i10", "other": "i2", "relation": "next_item"},
        {"anchor": "i2", "other": "i1", "relation": "also_buy"},
        {"anchor": "i9", "other": "i1", "relation": "next_item"},
    ]


def test_behaviour_merged_from_parts_equals_one_pass_over_all_users():
    """Ray tasks gather chunks of users and the driver merges their parts in user order: every cut gives the facts
    of one pass, ties of first summaries (same second) and the earliest-five item reviews included."""
    users = [f"u{n}" for n in range(8)]
    timelines = [
        (u, leave_last_out([Interaction(u, i, 10 + (n + k) % 3, 5.0, f"{u}:{i}", f"text {u}:{i}") for k, i in items]))
        for n, u in enumerate(users)
        for items in [list(enumerate(["i1", "i2", "i3", f"x{n}", "i4"][n % 2 :]))]
    ]
    whole = gather(timelines, quoted={"i1", "i2"})
    assert len(whole.item_reviews["i2"]) == 5  # more reviews than kept: the merge must choose the same five
    for cut in range(len(timelines) + 1):
        merged = gather(timelines[:cut], quoted={"i1", "i2"})
        merged.merge(gather(timelines[cut:], quoted={"i1", "i2"}))
        assert merged == whole, cut
        assert merged.next_item_pairs().equals(whole.next_item_pairs()), cut  # parts' tables: not in ==
        assert len(merged.next_items) == 1  # the parts gave way to the merged table: not held beside it


def test_kcore_degrees_summed_across_blocks_equal_one_count_over_all_rows() -> None:
    """A k-core round counts degrees per block and sums them on the driver: an item (or user) seen in many blocks
    gets its whole degree, also when the running total is merged midway (more pending rows than it holds)."""
    from collections import Counter

    from recfound.data.kcore import ITEM, USER, _degrees, _total_degrees

    rows = [(f"u{i % 9000}", f"i{(i * 7) % 300}") for i in range(90_000)]
    blocks = [pa.table({USER: [u for u, _ in part], ITEM: [i for _, i in part]}) for part in _chunks(rows, 7_000)]
    total = _total_degrees(_degrees(block) for block in blocks)
    got = {(side, key): degree for side, key, degree in zip(*(total[c].to_pylist() for c in total.column_names))}
    expected = Counter((USER, u) for u, _ in rows) + Counter((ITEM, i) for _, i in rows)
    assert got == dict(expected)


def _chunks(rows: list, size: int) -> list[list]:
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def test_deduplicated_blocks_hold_one_chunk_per_column_not_one_per_user() -> None:
    """The de-duplication group-by returns one table per user, and Ray Data stacks them into a block as chunks:
    on a 250k-review dump a 5 MB block came to the driver as ~3,000 chunks, ~120k buffers (49 MB of buffer objects
    alive there), and every later pass paid per chunk. Its blocks must be contiguous."""
    from recfound.data.kcore import dedupe

    n = 3000
    table = pa.table(
        {
            "user": [f"u{i % 600:04d}" for i in range(n)],
            "item": [f"i{i % 37}" for i in range(n)],
            "timestamp": list(range(n)),
            "file_index": [0] * n,
            "line": list(range(n)),
        }
    )
    blocks = list(dedupe(ray.data.from_arrow(table), n, {}).iter_batches(batch_format="pyarrow", batch_size=None))
    assert sum(block.num_rows for block in blocks) == len(
        {(u, i) for u, i in zip(table["user"].to_pylist(), table["item"].to_pylist())}
    )
    assert max(column.num_chunks for block in blocks for column in block.columns) == 1


def test_a_big_file_reaches_the_de_duplication_as_bounded_blocks(tmp_path, monkeypatch) -> None:
    """A sort-based group-by makes one partition per input block, and Ray Data merged a file's rows into one block
    of up to 128 MiB: an 8-file dump was 8 de-duplication tasks at any size (1.9 GB for one at 4M reviews). A
    build's blocks are at most ``MAX_BLOCK_BYTES``, so the tasks multiply with the input instead of growing."""
    from recfound.data import reading
    from recfound.data.kcore import dedupe
    from recfound.data.sources import BadRows

    monkeypatch.setattr(reading, "MAX_BLOCK_BYTES", 64 * 2**10)
    rows = [review(f"u{i % 500:03d}", f"i{i % 41}", i, summary=f"summary {i}") for i in range(4000)]
    url = write_lines(tmp_path / "reviews.json.gz", rows, compress=True)
    with reading.pipeline_context():
        reviews, count, _ = reading.read_role([url], "reviews", BadRows())
        read = reviews.materialize()
        unique = dedupe(read, count, {})
        blocks = list(unique.iter_batches(batch_format="pyarrow", batch_size=None))
    assert read.num_blocks() >= 4 and read.size_bytes() / read.num_blocks() <= 2 * 64 * 2**10
    assert len(blocks) >= 4
    assert sum(b.num_rows for b in blocks) == len({(r["reviewerID"], r["asin"]) for r in rows})
    users = [u for b in blocks for u in b["user"].to_pylist()]
    assert users == sorted(users)  # still one user after another, in order, across the blocks


def test_the_catalogue_holds_each_repeated_string_once():
    """A dump's parser makes a new string per row for every brand, category path and related id; kept as parsed,
    a 4M-review synthetic catalogue took 266 MiB of live objects, 68 MiB of them repeats. The catalogue keeps one
    object per distinct value, which pickling keeps shared in the templating workers' copies too."""
    from recfound.data.catalogue import build_catalogue
    from recfound.data.sources import Item

    def fresh(text: str) -> str:  # a distinct object with the same value, as json.loads makes one per row
        return "".join(list(text))

    meta = {
        i: Item(
            i, f"title {i}", "", (fresh("Books"), fresh("Poetry")), fresh("Acme"), (), (fresh("id-b"), fresh("id-c"))
        )
        for i in ("id-a", "id-b", "id-c")
    }
    for catalogue in (built := build_catalogue(list(meta), meta, {})), pickle.loads(pickle.dumps(built)):
        first, *others = catalogue.values()
        for item in others:
            assert item.brand is first.brand and item.category is first.category
            assert all(x is y for x, y in zip(item.categories, first.categories, strict=True))
        ids = {key: key for key in catalogue}
        assert first.also_buy == ("id-b", "id-c") and all(i is ids[i] for i in first.also_buy)


@pytest.mark.parametrize(
    "task", ["item_profile", "product_matching", "attribute_value_extraction", "product_relation_prediction"]
)
def test_item_tasks_yield_their_rows_one_at_a_time(task):
    """A task built from the catalogue has a row or two per item (per related pair for relations): held as one list,
    the 4M-review build's item profiles raised the driver by ~250 MiB at the build's end. Rows are yielded to the
    writer as they are made, so iterating holds a few at a time."""
    import tracemalloc

    from recfound.data.builder import BUILDERS

    n = 4000
    ids = [f"item-{i:05d}" for i in range(n)]
    catalogue = {
        item: CatalogueItem(
            item,
            f"Acme widget number {i}",
            f"Title: Acme widget number {i}; Category: Tools; Brand: Acme",
            "Tools",
            ("Tools",),
            "Acme",
            " ".join(["A sturdy widget made by Acme for every workshop"] * 8),
            ("steel",),
            also_buy=(ids[(i + 1) % n],),
            also_view=(ids[(i + 2) % n],),
            has_meta=True,
        )
        for i, item in enumerate(ids)
    }
    ctx = Context(seed=0, catalogue=catalogue)
    rows = list(BUILDERS[task](ctx))
    held = sum(len(row.prompt) + len(row.response) for _, row in rows)
    del rows
    tracemalloc.start()
    try:
        count = sum(1 for _ in BUILDERS[task](ctx))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count >= n and peak < held / 4, (count, peak, held)

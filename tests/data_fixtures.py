"""Shared helpers for the data tests: paths to the real slices and a small synthetic build."""

from __future__ import annotations

import contextlib
import gzip
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import ray

from recfound.data.builder import BuildConfig, build
from recfound.data.catalogue import variant_aliases
from recfound.data.sources import BadRows, Inputs, as_files, read_meta, read_reviews
from recfound.data.synthetic import SyntheticConfig
from recfound.data.templates import LETTERS

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "build_dataset.py"
SHARED = REPO.parent / "shared" / "data"
MAGAZINE = SHARED / "amazon2018" / "Magazine_Subscriptions"
MAGAZINE_REVIEWS = MAGAZINE / "Magazine_Subscriptions_5.json.gz"
MAGAZINE_META = MAGAZINE / "meta_Magazine_Subscriptions.json.gz"
ESCI_JUDGEMENTS = SHARED / "esci_judgments" / "esci_us_judgments.json"
SMALL = SyntheticConfig(users=80, items=40, queries=30)


def small_build(out: Path, seed: int = 0, **overrides) -> dict:
    """A synthetic build small enough to repeat in a test (about 0.5 s)."""
    return build(BuildConfig(out=str(out), seed=seed, synthetic=SMALL, **overrides))


@contextlib.contextmanager
def ray_seeing_memory(prefix: str) -> Iterator[None]:
    """A local Ray whose workers start with a copy of the ``memory://`` files under ``prefix``: the store is one
    process's, and the build's read tasks run in workers, as on a cluster whose nodes all see one bucket. A module's
    shared Ray is replaced by this one, which then serves the module's other builds (its workers' copies are
    harmless to them) and is stopped with the module: one Ray start fewer than starting the shared one again."""
    fs = fsspec.filesystem("memory")
    files = {path: fs.cat(path) for path in fs.find(prefix)}

    def hook() -> None:  # nested, so Ray ships it by value: workers cannot import the tests
        fsspec.filesystem("memory").pipe(files)

    shared = ray.is_initialized()  # a module's shared Ray: its workers started without the files
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"worker_process_setup_hook": hook})
    try:
        yield
    finally:
        if not shared:
            ray.shutdown()


def in_memory_interactions(reviews: Inputs, meta: Inputs, k: int) -> set[tuple]:
    """(user, item, timestamp, split) of the interactions main's in-memory builder (before the Ray Data pipeline)
    kept, by its own steps: variants merged, each user's first interaction with an item (a stable sort by time, so
    input order breaks ties), cascading k-core, leave-last-out per user."""
    reviews = read_reviews(as_files(reviews), BadRows())
    items, _ = read_meta(as_files(meta), BadRows())
    aliases = variant_aliases((r.item for r in reviews), items)
    seen, rows = set(), []
    for r in sorted(reviews, key=lambda r: r.timestamp):
        item = aliases.get(r.item, r.item)
        if (r.user, item) not in seen:
            seen.add((r.user, item))
            rows.append((r.user, item, r.timestamp))
    while True:
        users, degrees = Counter(r[0] for r in rows), Counter(r[1] for r in rows)
        kept = [r for r in rows if users[r[0]] >= k and degrees[r[1]] >= k]
        if len(kept) == len(rows):
            break
        rows = kept
    by_user = defaultdict(list)
    for r in rows:  # already in time order
        by_user[r[0]].append(r)
    return {
        (*r, split)
        for timeline in by_user.values()
        for r, split in zip(timeline, ["train"] * max(len(timeline) - 2, 0) + ["valid", "test"][-len(timeline) :])
    }


def read_task(out: Path, task: str, split: str) -> list[dict]:
    return pq.read_table(out / "tasks" / task / f"{split}.parquet").to_pylist()


def write_lines(path: Path, rows: list, compress: bool = False) -> str:
    """JSON lines (dicts are dumped, strings written as they are, so a test can plant a broken line)."""
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode()) if compress else text.encode())
    return str(path)


def review(user: str, item: str, time: int, rating: float = 5.0, summary: str = "fine thing") -> dict:
    return {
        "reviewerID": user,
        "asin": item,
        "overall": rating,
        "unixReviewTime": time,
        "summary": summary,
        "reviewText": f"{summary}, really",
    }


def _titles(text: str) -> set[str]:
    """Item titles in a history ("3. title") or an option list ("C: title")."""
    return {m.group(2) for m in re.finditer(rf"^(\d+\.|[{LETTERS}]:) (.+)$", text, re.MULTILINE)}


def assert_no_leakage(out: Path) -> None:
    """A user's valid/test target is never a positive, a history entry or an option in that user's train rows."""
    title = {i["item_id"]: i["title"] for i in pq.read_table(out / "items.parquet").to_pylist()}
    for task, item_key, text_key in (
        ("u2i", "pos_item", "query"),
        ("sequential_recommendation", "item", "prompt"),
        ("explanation_generation", "item", "prompt"),
        ("candidate_ranking", "item", "prompt"),
    ):
        seen_items: dict[str, set[str]] = {}
        seen_titles: dict[str, set[str]] = {}
        for row in read_task(out, task, "train"):  # every candidate, "no" rows' included
            seen_items.setdefault(row["user"], set()).add(row[item_key])
            seen_titles.setdefault(row["user"], set()).update(_titles(row[text_key]))
        for split in ("valid", "test"):
            for row in read_task(out, task, split):
                if row.get("response") == "no":  # a candidate_ranking negative is no held-out target
                    continue
                target = row[item_key]
                assert target not in seen_items.get(row["user"], set()), (task, row["id"])
                assert title[target] not in seen_titles.get(row["user"], set()), (task, row["id"])
    last: dict[str, str] = {}
    own: dict[str, set[str]] = {}
    for row in pq.read_table(out / "interactions.parquet").to_pylist():
        last[row["user"]] = row["split"]
        own.setdefault(row["user"], set()).add(row["item"])
    assert set(last.values()) == {"test"}
    for split in ("train", "valid", "test"):  # a user's own items are never their negatives
        assert all(not own[r["user"]] & set(r["neg_items"]) for r in read_task(out, "u2i", split))
        ranking = read_task(out, "candidate_ranking", split)
        assert all(r["item"] not in own[r["user"]] for r in ranking if r["response"] == "no")

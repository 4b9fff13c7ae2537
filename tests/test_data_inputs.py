"""Multi-file inputs (shards, directories, globs, comma lists, memory://) and the dump-scale synthetic writer."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
from data_fixtures import JOB, in_memory_interactions, ray_seeing_memory, write_lines
from pydantic import ValidationError

from recfound.data.builder import BuildConfig, build
from recfound.data.sources import BadRows, DataError, read_reviews
from recfound.data.synthetic_dump import DumpConfig, write_dump
from recfound.io import NoInputFiles, expand, sha256

pytestmark = pytest.mark.usefixtures("shared_ray")  # one local Ray for the module's builds (conftest.py)

DUMP = DumpConfig(reviews=2000, shards=3, items=100)


def _lines(url: str) -> list[str]:
    return gzip.decompress(Path(url).read_bytes()).decode().splitlines()


def _parquet(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}


@pytest.fixture(scope="module")
def dump(tmp_path_factory) -> dict[str, str]:
    return write_dump(DUMP.model_copy(update={"out": str(tmp_path_factory.mktemp("dump"))}))


@pytest.fixture(scope="module")
def sharded_build(tmp_path_factory, dump) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sharded")
    return out, build(BuildConfig(out=str(out), **dump))


def test_shards_build_exactly_like_their_concatenation(tmp_path, dump, sharded_build):
    out, manifest = sharded_build
    single = {
        role: write_lines(
            tmp_path / f"{role}.json.gz", [line for url in expand(spec) for line in _lines(url)], compress=True
        )
        for role, spec in dump.items()
    }
    reference = build(BuildConfig(out=str(tmp_path / "single"), **single))
    assert _parquet(out) == _parquet(tmp_path / "single") and _parquet(out)
    assert {k: manifest[k] for k in ("tasks", "filtered", "users", "items")} == {
        k: reference[k] for k in ("tasks", "filtered", "users", "items")
    }
    shards = [url for role in ("reviews", "meta") for url in expand(dump[role])]
    assert len(shards) == 2 * DUMP.shards
    assert manifest["sources"] == [
        {"role": role, "url": url, "sha256": sha256(url)} for role in ("reviews", "meta") for url in expand(dump[role])
    ]
    assert manifest["config"]["reviews"] == dump["reviews"]  # the spec as given; the files are in sources


def test_the_pipeline_keeps_the_interactions_the_in_memory_builder_kept(dump, sharded_build):
    """On shards with the real dumps' quirks (repeated reviews, item variants, repeated metadata) and a k-core that
    cascades: the rows main's in-memory builder kept."""
    out, manifest = sharded_build
    rows = pq.read_table(out / "interactions.parquet").to_pylist()
    built = {(r["user"], r["item"], r["timestamp"], r["split"]) for r in rows}
    filtered = manifest["filtered"]
    assert min(filtered[k] for k in ("merged_item_variants", "duplicate_interactions", "duplicate_meta_rows")) > 0
    assert len(built) == len(rows) and built == in_memory_interactions(expand(dump["reviews"]), expand(dump["meta"]), 5)


def test_a_directory_a_glob_and_a_comma_list_name_the_same_files(tmp_path):
    folder = tmp_path / "reviews"
    folder.mkdir()
    files = [write_lines(folder / f"part-{k:05d}.json.gz", [{"k": k}], compress=True) for k in range(3)]
    (folder / "README.txt").write_text("not a shard")  # a directory contributes its dump files only
    (folder / "_SUCCESS").write_text("")
    assert expand(str(folder)) == expand(f"{folder}/") == files
    assert expand(f"{folder}/part-*.json.gz") == files
    assert expand(",".join(reversed(files))) == files  # sorted whatever the order given
    assert expand(f"{files[1]}, {folder}/part-0000[02].json.gz,{files[1]}") == files  # each file once
    nested = tmp_path / "nested" / "2018"
    nested.mkdir(parents=True)
    (nested / "part.jsonl").write_text("{}\n")
    assert expand(str(tmp_path / "nested")) == [str(nested / "part.jsonl")]  # at any depth
    assert expand(files[0]) == [files[0]]


@pytest.mark.slow  # a second local Ray (memory:// workers or the job's own): not in `make test-fast`
def test_a_memory_glob_builds_like_the_local_dump(dump, sharded_build):
    fs = fsspec.filesystem("memory")
    try:
        for role, spec in dump.items():
            for url in expand(spec):
                fs.pipe(f"/recfound-inputs/{role}/{Path(url).name}", Path(url).read_bytes())
        urls = expand("memory://recfound-inputs/reviews/part-*.json.gz")
        assert [u.rsplit("/", 1)[1] for u in urls] == ["part-00000.json.gz", "part-00001.json.gz", "part-00002.json.gz"]
        cfg = BuildConfig(
            out="memory://recfound-inputs/out",
            reviews="memory://recfound-inputs/reviews/*.json.gz",
            meta="memory://recfound-inputs/meta",
        )
        with ray_seeing_memory("/recfound-inputs"):
            manifest = build(cfg)
        assert [s["url"] for s in manifest["sources"]][:3] == urls
        out, _ = sharded_build
        for name, data in _parquet(out).items():
            assert fs.cat(f"/recfound-inputs/out/{name}") == data, name
    finally:
        fs.rm("/recfound-inputs", recursive=True)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{dir}/part-*.jsonl", "no file matches {dir}/part-*.jsonl"),
        ("{dir}/part-00000.json.gz,{dir}/missing.json.gz", "no such file or directory: {dir}/missing.json.gz"),
        ("{empty}", "file in directory {empty}"),
        ("memory://recfound-nothing/*.json.gz", "no file matches memory://recfound-nothing/*.json.gz"),
        (" , ", "no file given"),
    ],
)
def test_an_input_naming_no_file_is_rejected_before_any_work(tmp_path, dump, spec, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("")
    values = {"dir": dump["reviews"], "empty": str(tmp_path / "empty")}
    spec, message = spec.format(**values), message.format(**values)
    with pytest.raises(NoInputFiles, match=re.escape(message)):
        expand(spec)
    with pytest.raises(ValidationError, match=re.escape(message)):
        BuildConfig(out=str(tmp_path / "out"), reviews=dump["reviews"], meta=spec)


def test_a_bad_line_in_a_middle_shard_is_named_by_its_file_and_line(tmp_path, dump, sharded_build):
    shards = expand(dump["reviews"])
    lines = {url: _lines(url) for url in shards}
    broken = tmp_path / "reviews"
    broken.mkdir()
    for url, rows in lines.items():
        middle = url == shards[1]
        write_lines(broken / Path(url).name, [*rows[:6], "{broken", *rows[7:]] if middle else rows, compress=True)
    bad_shard = str(broken / Path(shards[1]).name)
    with pytest.raises(DataError, match=re.escape(f"{bad_shard} line 7: malformed JSON")):
        build(BuildConfig(out=str(tmp_path / "strict"), reviews=str(broken), meta=dump["meta"]))
    manifest = build(
        BuildConfig(out=str(tmp_path / "skip"), reviews=str(broken), meta=dump["meta"], on_bad_rows="skip")
    )
    assert manifest["quarantined"]["by_file"] == {bad_shard: 1}
    quarantined = [json.loads(r) for r in (tmp_path / "skip" / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["file"], q["line"]) for q in quarantined] == [(bad_shard, 7)]
    # the only row lost: the build equals one from the shards without that line
    write_lines(broken / Path(shards[1]).name, [*lines[shards[1]][:6], *lines[shards[1]][7:]], compress=True)
    build(BuildConfig(out=str(tmp_path / "without"), reviews=str(broken), meta=dump["meta"]))
    assert _parquet(tmp_path / "skip") == _parquet(tmp_path / "without")
    assert manifest["filtered"]["reviews_read"] == DUMP.reviews - 1


def test_readers_take_several_files_and_keep_each_files_line_numbers(tmp_path):
    first = write_lines(tmp_path / "a.json", [{"reviewerID": "u", "asin": "i", "overall": 5.0, "unixReviewTime": 1}])
    second = write_lines(
        tmp_path / "b.json",
        [
            {"user_id": "u", "parent_asin": "j", "rating": 4, "timestamp": 2000},
            {"user_id": "u", "parent_asin": "k", "rating": "x", "timestamp": 3},
        ],
    )
    with pytest.raises(DataError, match=re.escape(f"{second} line 2: field 'rating'")):
        read_reviews([first, second], BadRows())
    assert [r.item for r in read_reviews([first, second], BadRows("skip"))] == ["i", "j"]  # schema per file
    with pytest.raises(DataError, match=re.escape(f"{first} .. {second} (2 files): no usable review rows")):
        read_reviews(
            [write_lines(tmp_path / "a.json", ["{"]), write_lines(tmp_path / "b.json", ["["])], BadRows("skip")
        )


def test_the_dump_writer_is_deterministic_and_has_the_real_dumps_quirks(tmp_path, dump, sharded_build):
    again = write_dump(DUMP.model_copy(update={"out": str(tmp_path / "again")}))
    other = write_dump(DUMP.model_copy(update={"out": str(tmp_path / "other"), "seed": 1}))
    for role in ("reviews", "meta"):
        same = [Path(u).read_bytes() for u in expand(dump[role])]
        assert same == [Path(u).read_bytes() for u in expand(again[role])]
        assert same != [Path(u).read_bytes() for u in expand(other[role])]
    reviews = [json.loads(line) for url in expand(dump["reviews"]) for line in _lines(url)]
    assert len(reviews) == DUMP.reviews and all(_lines(url) for url in expand(dump["reviews"]))
    assert any(a == b for a, b in zip(reviews, reviews[1:]))  # a review written twice
    assert any("reviewText" not in r for r in reviews) and any(isinstance(r.get("vote"), str) for r in reviews)
    _, manifest = sharded_build
    filtered = manifest["filtered"]
    assert filtered["merged_item_variants"] > 0 and filtered["duplicate_meta_rows"] > 0
    assert filtered["items_without_meta"] > 0 and filtered["duplicate_interactions"] > 0
    assert filtered["kcore_removed_interactions"] < DUMP.reviews // 10 and manifest["users"] > 100
    assert set(manifest["tasks"]) >= {
        "u2i",
        "i2i",
        "sequential_recommendation",
        "product_relation_prediction",
        "item_profile",
        "candidate_ranking",
    }
    with pytest.raises(ValidationError, match="shards=60 would leave a file empty"):
        DumpConfig(reviews=2000, items=100, shards=60)


def _traced_peak(cfg: DumpConfig) -> int:
    tracemalloc.start()
    try:
        write_dump(cfg)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_dump_writer_streams(tmp_path):
    """Ten times the reviews, about the same peak memory: rows are written as they are made. The catalogue is fixed
    and its bounded cache of items warmed first, so both runs hold the same items."""
    small = DumpConfig(reviews=1000, shards=2, items=200, seed=7, out=str(tmp_path / "small"))
    write_dump(small)
    small_peak = _traced_peak(small)
    large_peak = _traced_peak(small.model_copy(update={"reviews": 10000, "out": str(tmp_path / "large")}))
    assert large_peak < 1.2 * small_peak, (small_peak, large_peak)


@pytest.mark.slow  # a second local Ray (memory:// workers or the job's own): not in `make test-fast`
def test_synthetic_dump_cli_writes_a_dump_that_builds_from_its_folders(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=120)

    help_text = run("synthetic-dump", "--help").stdout
    assert all(re.search(rf"^  {key} \(", help_text, re.MULTILINE) for key in DumpConfig.model_fields)
    assert "synthetic-dump" in run("--help").stdout
    raw = tmp_path / "raw"
    result = run("synthetic-dump", "reviews=600", "shards=2", f"out={raw}")
    assert result.returncode == 0, result.stderr
    assert f"reviews={raw}/reviews meta={raw}/meta" in result.stdout
    result = run(f"reviews={raw}/reviews", f"meta={raw}/meta/part-*.json.gz", f"out={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    assert len(json.loads((tmp_path / "out" / "manifest.json").read_text())["sources"]) == 4
    result = run(f"reviews={raw}/reviews/part-*.jsonl", f"out={tmp_path / 'nothing'}")
    assert (
        result.returncode != 0 and f"reviews: Value error, no file matches {raw}/reviews/part-*.jsonl" in result.stderr
    )
    assert not (tmp_path / "nothing").exists()

"""jobs/build_dataset.py as users run it: --help, the real Magazine slice with ESCI, no arguments, bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import ray
from data_fixtures import (
    ESCI_JUDGEMENTS,
    JOB,
    MAGAZINE_META,
    MAGAZINE_REVIEWS,
    assert_no_leakage,
    review,
    small_build,
    write_lines,
)

from recfound.data.builder import BuildConfig
from recfound.data.reading import local_ray
from recfound.data.synthetic import SyntheticConfig
from recfound.tasks import ALL_TASKS, SPLITS

# sha256 sums from the slices' SOURCE.txt: the build reads the files unchanged.
MAGAZINE_SHA256 = {
    MAGAZINE_REVIEWS.name: "95c124603d62d6acdfd1bd62284934fb6c513db836ea64c2e8176c14256426f2",
    MAGAZINE_META.name: "147cb78dac0f9ce04849b196e2e13cad6a504bff45d53500b7a1fe8121d91595",
}


def run_job(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def _rows_per_second(stdout: str) -> float:
    match = re.search(r"\(([\d,]+) rows/s\)", stdout)
    assert match, stdout
    return float(match.group(1).replace(",", ""))


def test_help_documents_every_key():
    result = run_job("--help")
    assert result.returncode == 0, result.stderr
    keys = [k for k in BuildConfig.model_fields if k != "synthetic"]
    keys += [f"synthetic.{k}" for k in SyntheticConfig.model_fields]
    for key in keys:
        assert re.search(rf"^  {re.escape(key)} \(", result.stdout, re.MULTILINE), key
    assert "reviews=" in result.stdout and "manifest.json" in result.stdout


@pytest.mark.slow  # the job starts its own local Ray for the build: not in `make test-fast`
@pytest.mark.skipif(
    not MAGAZINE_REVIEWS.exists(), reason=f"real Amazon 2018 slice not found at {MAGAZINE_REVIEWS.parent}"
)
@pytest.mark.skipif(not ESCI_JUDGEMENTS.exists(), reason=f"real ESCI slice not found at {ESCI_JUDGEMENTS}")
def test_real_magazine_slice_with_esci(tmp_path):
    out = tmp_path / "magazine"
    result = run_job(f"reviews={MAGAZINE_REVIEWS}", f"meta={MAGAZINE_META}", f"queries={ESCI_JUDGEMENTS}", f"out={out}")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    for task, counts in manifest["tasks"].items():
        assert re.search(rf"^{task} +{counts['train']} +{counts['valid']} +{counts['test']}$", result.stdout, re.M)
    assert _rows_per_second(result.stdout) > 0
    built = {
        "u2i",
        "q2i",
        "i2i",
        "sequential_recommendation",
        "sentiment_analysis",
        "user_profile",
        "product_relation_prediction",
        "product_matching",
        "item_profile",
        "attribute_value_extraction",
        "explanation_generation",
        "candidate_ranking",
    }
    assert set(manifest["tasks"]) == built
    assert all(manifest["tasks"][t][s] > 0 for t in built for s in SPLITS)
    # The judged ASINs are not in this catalogue and the judgements carry no product text.
    assert manifest["q2i"]["pseudo_queries"] is True and "ESCI" in manifest["q2i"]["reason"]
    assert "product titles" in manifest["skipped_tasks"]["query_rewriting"]
    sums = {Path(s["url"]).name: s["sha256"] for s in manifest["sources"]}
    assert {k: sums[k] for k in MAGAZINE_SHA256} == MAGAZINE_SHA256
    assert manifest["filtered"]["duplicate_meta_rows"] > 0 and manifest["filtered"]["items_without_meta"] > 0
    assert manifest["users"] > 250 and manifest["quarantined"]["total"] == 0
    assert_no_leakage(out)


@pytest.mark.slow  # the job starts its own local Ray for the build: not in `make test-fast`
def test_no_arguments_builds_the_synthetic_default(tmp_path):
    result = run_job(cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "runs" / "data" / "synthetic"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["synthetic"] and (out / "raw" / "reviews_Synthetic_5.json.gz").exists()
    # every task but the two QA ones, which need qa= (the synthetic catalogue has no questions)
    assert set(manifest["tasks"]) == set(ALL_TASKS) - {"answerability_prediction", "answer_generation"}
    assert _rows_per_second(result.stdout) > 0
    # a quiet console: Ray's own notices and Ray Data's execution plans and progress stay in Ray's log files
    chatter = [line for line in result.stderr.splitlines() if re.search(r"\s(INFO|WARNING)\s", line)]
    assert not chatter, chatter[:3]


@pytest.mark.slow  # the job starts its own local Ray for the build: not in `make test-fast`
def test_bad_input_exits_non_zero_naming_file_line_and_field(tmp_path):
    rows = [review("u1", "i1", 1), {"reviewerID": "u1", "asin": "i2", "overall": "abc", "unixReviewTime": 2}]
    url = write_lines(tmp_path / "reviews.json", rows)
    result = run_job(f"reviews={url}", f"out={tmp_path / 'out'}")
    assert result.returncode != 0
    assert f"{url} line 2: field 'overall'" in result.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()
    result = run_job(f"reviews={url}", "tasks=u2i,nonsense", f"out={tmp_path / 'out'}")
    assert result.returncode != 0 and "unknown task 'nonsense'" in result.stderr
    result = run_job(f"reviews={tmp_path / 'missing.json'}")
    assert result.returncode != 0 and "reviews" in result.stderr and "missing.json" in result.stderr


def test_a_build_caps_the_object_store_of_the_ray_it_starts(tmp_path, monkeypatch):
    """The kept reviews and shuffles live in the object store: a build's own Ray gets ``object_store_mib`` (past
    it Ray spills to disk), so that share of a build's memory follows the setting, not the machine; unset, Ray's
    default size. The rows are the same either way."""
    assert not ray.is_initialized()  # the build starts its own Ray, as jobs/build_dataset.py does
    sizes = []
    start = ray.init

    def init(*args, **kwargs):
        context = start(*args, **kwargs)
        sizes.append(ray.cluster_resources()["object_store_memory"])
        return context

    monkeypatch.setattr(ray, "init", init)
    small_build(tmp_path / "capped", object_store_mib=100)
    small_build(tmp_path / "default", object_store_mib=None)
    assert not ray.is_initialized()
    assert sizes[0] == 100 * 2**20 and sizes[1] > 100 * 2**20, sizes
    capped, default = (
        {p.relative_to(tmp_path / d): p.read_bytes() for p in (tmp_path / d).rglob("*.parquet")}
        for d in ("capped", "default")
    )
    assert capped and capped == default


@ray.remote
def _worker_pid() -> int:
    return os.getpid()


def test_the_ray_a_build_starts_lets_an_idle_worker_exit():
    """A pooled Ray worker keeps what its tasks left (a templating worker: the catalogue and some 300 MiB more at
    1M reviews) while it waits for work, and Ray keeps one per CPU: two held 1.5 GiB through a 4M-review build's
    cross-user stages. The Ray a build starts for itself lets a worker idle for a second exit."""
    assert not ray.is_initialized()  # the build starts its own Ray, as jobs/build_dataset.py does
    with local_ray(100 * 2**20):
        worker = psutil.Process(ray.get(_worker_pid.remote()))
        worker.wait(timeout=30)  # psutil.TimeoutExpired if the idle worker stays
    assert not ray.is_initialized()

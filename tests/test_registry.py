"""Model registry: atomic numbered publish, checksum refusal, resolve (local and remote), the publish CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import fsspec
import pytest
from test_serve_engine import FAKE_ENGINE, make_artifact, make_dataset, publish_fake

from recfound.serving.index import build_item_index, text_meta
from recfound.serving.publish import publish
from recfound.serving.registry import (
    CLAIMS,
    ChecksumError,
    RegistryError,
    VersionNotFound,
    latest_version,
    list_versions,
    read_version,
    resolve,
    verify,
)

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "publish.py"
T = TypeVar("T")


def _twice_at_once(call: Callable[[], T]) -> list[T]:
    """``call`` on two threads at once; both results, or the first one's exception re-raised here."""
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(call) for _ in range(2)]
        return [future.result() for future in futures]


def _entries(registry: Path) -> list[str]:
    """Version folders and any temp folder left behind (the claim markers' folder aside)."""
    return sorted(p.name for p in (registry / "versions").iterdir() if p.name != CLAIMS)


def test_publish_numbers_versions_and_moves_latest(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    model, data = make_artifact(tmp_path / "model"), make_dataset(tmp_path / "data")
    assert publish_fake(model, data, str(registry)) == "v1"
    assert publish_fake(model, data, str(registry)) == "v2"
    assert list_versions(str(registry)) == ["v1", "v2"] == _entries(registry)  # no temp folders left
    assert latest_version(str(registry)) == "v2"
    v2 = resolve(str(registry))
    assert v2 == str(registry / "versions" / "v2") and resolve(str(registry), "v1").endswith("v1")
    meta = read_version(v2)
    assert meta["version"] == "v2" and meta["engine"] == FAKE_ENGINE and meta["max_history"] == 3
    assert set(meta["index_files"]) == {"index/items.parquet", "index/u2i.npy", "index/q2i.npy", "index/i2i.npy"}
    verify(v2)


def test_checksum_mismatch_publishes_nothing(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    model, data = make_artifact(tmp_path / "model"), make_dataset(tmp_path / "data")
    publish_fake(model, data, str(registry))
    (model / "weights" / "adapter.bin").write_bytes(b"truncated")
    with pytest.raises(ChecksumError, match=r"model: weights/adapter.bin does not match its SHA-256 in manifest.json"):
        publish_fake(model, data, str(registry))
    assert latest_version(str(registry)) == "v1"
    assert _entries(registry) == ["v1"]


def test_unlisted_and_missing_files_are_refused(tmp_path: Path) -> None:
    model, data = make_artifact(tmp_path / "model"), make_dataset(tmp_path / "data")
    (model / "stray.txt").write_text("not merged")
    with pytest.raises(ChecksumError, match="not listed in manifest.json: stray.txt"):
        publish_fake(model, data, str(tmp_path / "registry"))
    (model / "stray.txt").unlink()
    (model / "weights" / "adapter.bin").unlink()
    with pytest.raises(ChecksumError, match="weights/adapter.bin is listed in manifest.json but missing"):
        publish_fake(model, data, str(tmp_path / "registry"))
    assert _entries(tmp_path / "registry") == []
    with pytest.raises(VersionNotFound, match="no published version"):
        resolve(str(tmp_path / "registry"))


def test_index_failure_leaves_latest_and_no_partial_version(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    model, data = make_artifact(tmp_path / "model"), make_dataset(tmp_path / "data")
    publish_fake(model, data, str(registry))

    def broken_index(version_dir: str) -> None:
        (Path(version_dir) / "index").mkdir()
        raise RuntimeError("out of memory while embedding")

    with pytest.raises(RuntimeError, match="out of memory"):
        publish(str(model), str(registry), broken_index, {"engine": FAKE_ENGINE})
    assert latest_version(str(registry)) == "v1" and _entries(registry) == ["v1"]


def test_corruption_after_publish_is_detected(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    publish_fake(make_artifact(tmp_path / "model"), make_dataset(tmp_path / "data"), str(registry))
    index_file = registry / "versions" / "v1" / "index" / "q2i.npy"
    index_file.write_bytes(index_file.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ChecksumError, match="index/q2i.npy"):
        verify(resolve(str(registry)))


def test_remote_registry_resolves_into_a_local_cache(tmp_path: Path) -> None:
    registry = "memory://recfound-test-registry"
    model, data = make_artifact(tmp_path / "model"), make_dataset(tmp_path / "data")
    try:
        assert publish_fake(model, data, registry) == "v1"
        fs = fsspec.filesystem("memory")
        # A crashed upload leaves a version folder without its commit marker: invisible, and never reused.
        fs.pipe("/recfound-test-registry/versions/v2/manifest.json", b"{}")
        assert list_versions(registry) == ["v1"]
        assert publish_fake(model, data, registry) == "v3"
        with pytest.raises(VersionNotFound, match=r"no version v2 .*versions: v1, v3"):
            resolve(registry, "v2", cache_dir=str(tmp_path / "cache"))
        local = resolve(registry, cache_dir=str(tmp_path / "cache"))
        assert local.startswith(str(tmp_path / "cache")) and local.endswith("v3")
        verify(local)
        assert resolve(registry, cache_dir=str(tmp_path / "cache")) == local  # cached, not downloaded again
        (model / "weights" / "adapter.bin").write_bytes(b"bad")
        with pytest.raises(ChecksumError):
            publish_fake(model, data, registry)
        assert not fs.exists("/recfound-test-registry/versions/v4") and latest_version(registry) == "v3"
    finally:
        fsspec.filesystem("memory").rm("/recfound-test-registry", recursive=True)


def test_cached_copies_survive_concurrent_downloads_and_corruption(tmp_path: Path, monkeypatch) -> None:
    """Replicas sharing a cache: the one that loses the rename uses the winner's copy; a corrupted cached copy
    is fetched again rather than refused forever."""
    from recfound.serving import registry as reg

    url, cache = f"memory://cache-{tmp_path.name}", str(tmp_path / "cache")
    try:
        publish_fake(make_artifact(tmp_path / "model"), make_dataset(tmp_path / "data"), url)
        both_copied, one_reader, copy = threading.Barrier(2, timeout=30), threading.Lock(), reg.copy_tree

        def copy_then_wait(src: str, dest: Path) -> None:
            with one_reader:  # memory:// hands concurrent readers one shared file cursor; S3 or GCS do not
                copy(src, dest)
            both_copied.wait()  # both downloads are complete before either renames

        monkeypatch.setattr(reg, "copy_tree", copy_then_wait)
        paths = _twice_at_once(lambda: reg.resolve_verified(url, cache_dir=cache))
        assert len(set(paths)) == 1
        monkeypatch.setattr(reg, "copy_tree", copy)
        weights = Path(paths[0]) / "weights" / "adapter.bin"
        weights.write_bytes(b"flipped on disk")
        assert reg.resolve_verified(url, cache_dir=cache) == paths[0]  # fetched again, verified
        assert weights.read_bytes() != b"flipped on disk"
    finally:
        fsspec.filesystem("memory").rm(f"/cache-{tmp_path.name}", recursive=True)


def test_version_names_are_validated(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    publish_fake(make_artifact(tmp_path / "model"), make_dataset(tmp_path / "data"), str(registry))
    for bad in ("../v1", "v01", "1", "v1/index"):
        with pytest.raises(VersionNotFound, match="invalid version name"):
            resolve(str(registry), bad)


def test_concurrent_name_clash_fails_cleanly(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    model = make_artifact(tmp_path / "model")

    def claim_v1_meanwhile(version_dir: str) -> None:
        (registry / "versions" / "v1").mkdir()
        (registry / "versions" / "v1" / "version.json").write_text("{}")

    with pytest.raises(RegistryError, match="published concurrently"):
        publish(str(model), str(registry), claim_v1_meanwhile, {"engine": FAKE_ENGINE})
    assert _entries(registry) == ["v1"]


def test_concurrent_publishes_get_distinct_versions(tmp_path: Path) -> None:
    """Two publishers started together (both past numbering before either writes): both land, as v1 and v2.
    Before claims one failed to rename onto the other's v1. (Local only: memory:// shares one file cursor
    between concurrent readers, which no real store does.)"""
    registry = str(tmp_path / "registry")
    model, data = make_artifact(tmp_path / "model"), make_dataset(tmp_path / "data")
    meta = {"engine": FAKE_ENGINE, **text_meta(json.loads((data / "manifest.json").read_text()))}
    both_numbered = threading.Barrier(2, timeout=30)

    def index_after_both_numbered(version_dir: str) -> None:
        both_numbered.wait()
        build_item_index(version_dir, items_url=str(data / "items.parquet"))

    names = _twice_at_once(lambda: publish(str(model), registry, index_after_both_numbered, meta))
    assert sorted(names) == ["v1", "v2"]
    assert list_versions(registry) == ["v1", "v2"] and latest_version(registry) == "v2"
    for name in names:
        verify(resolve(registry, name, str(tmp_path / "cache")))


def _job_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}


def test_publish_cli_help_and_run(tmp_path: Path) -> None:
    help_out = subprocess.run([sys.executable, str(JOB), "--help"], capture_output=True, text=True, check=True)
    assert "model=<merged dir>" in help_out.stdout and "serve (str or None" in help_out.stdout
    model, data = make_artifact(tmp_path / "model"), make_dataset(tmp_path / "data")
    registry = tmp_path / "registry"
    args = [sys.executable, str(JOB), f"model={model}", f"data={data}", f"registry={registry}", f"engine={FAKE_ENGINE}"]
    run = subprocess.run(args, capture_output=True, text=True, env=_job_env(), timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "v1" and json.loads((registry / "latest.json").read_text())["version"] == "v1"
    bad = subprocess.run([*args[:2], f"model={tmp_path / 'nope'}", *args[3:]], capture_output=True, text=True)
    assert bad.returncode != 0 and "model: " in bad.stderr and "no such file" in bad.stderr


def test_version_json_is_covered_by_the_checksums(tmp_path: Path) -> None:
    """version.json names the engine factory serving imports: a tampered one must fail verification first."""
    registry = tmp_path / "registry"
    publish_fake(make_artifact(tmp_path / "model"), make_dataset(tmp_path / "data"), str(registry))
    meta_path = registry / "versions" / "v1" / "version.json"
    original = meta_path.read_text()
    meta_path.write_text(original.replace(FAKE_ENGINE, "os:system"))
    with pytest.raises(ChecksumError, match="version.json does not match its SHA-256 in checksums.json"):
        verify(resolve(str(registry)))
    meta_path.write_text(original)
    verify(resolve(str(registry)))
    (registry / "versions" / "v1" / "sitecustomize.py").write_text("planted")
    with pytest.raises(ChecksumError, match="not listed in checksums.json: sitecustomize.py"):
        verify(resolve(str(registry)))


def test_remote_keys_outside_the_version_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    """Object-store keys are arbitrary strings: a listing yielding ``v1/../../../evil`` must not escape the cache."""
    url, cache = f"memory://escape-{tmp_path.name}", tmp_path / "cache"
    fs = fsspec.filesystem("memory")
    try:
        publish_fake(make_artifact(tmp_path / "model"), make_dataset(tmp_path / "data"), url)
        fs.pipe(f"/escape-{tmp_path.name}/versions/v1/../../../evil", b"owned")
        with pytest.raises(RegistryError, match=r"refusing to copy .*\.\./\.\./\.\./evil"):
            resolve(url, cache_dir=str(cache))
        assert not (tmp_path / "evil").exists() and not list(cache.rglob("*.json"))
    finally:
        fs.rm(f"/escape-{tmp_path.name}", recursive=True)


def test_a_version_is_on_disk_before_the_rename_that_commits_it(tmp_path: Path, monkeypatch) -> None:
    """Every staged file and folder is fsynced before the commit rename, the versions folder after it, and the
    ``latest`` pointer before its own rename: a power cut must not leave a committed version with empty files."""
    events: list[tuple[str, ...]] = []
    fsync, rename = os.fsync, os.rename

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_rename(src: str, dst: str) -> None:
        events.append(("rename", str(src), str(dst)))
        rename(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "rename", recording_rename)
    registry = tmp_path / "registry"
    publish_fake(make_artifact(tmp_path / "model"), make_dataset(tmp_path / "data"), str(registry))
    final = registry / "versions" / "v1"
    at = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(final))
    stage = events[at][1]
    synced = {Path(e[1]).relative_to(stage).as_posix() for e in events[:at] if e[1].startswith(stage)}
    assert {p.relative_to(final).as_posix() for p in final.rglob("*")} | {"."} <= synced
    assert ("fsync", str(registry / "versions")) in events[at:]
    pointer = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(registry / "latest.json"))
    assert ("fsync", events[pointer][1]) in events[:pointer] and ("fsync", str(registry)) in events[pointer:]


def test_stale_stage_folders_are_cleaned_and_live_ones_kept(tmp_path: Path, monkeypatch) -> None:
    """A crashed publisher's ``.tmp-*`` goes at the next publish once older than STALE_STAGE_S; a publisher
    still at work (it holds a lock on its folder) and a fresh folder are left alone."""
    import fcntl

    from recfound.serving import registry as reg

    versions = tmp_path / "registry" / "versions"
    hour_ago = time.time() - 3700
    for name in (".tmp-v7-crashed", ".tmp-v8-live", ".tmp-v9-fresh"):
        (versions / name / "weights").mkdir(parents=True)
        (versions / name / "weights" / "adapter.bin").write_bytes(b"partial")
    for name in (".tmp-v7-crashed", ".tmp-v8-live"):
        os.utime(versions / name, (hour_ago, hour_ago))
    live = os.open(versions / ".tmp-v8-live", os.O_RDONLY)
    try:
        fcntl.flock(live, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert reg.STALE_STAGE_S == 3600
        publish_fake(make_artifact(tmp_path / "model"), make_dataset(tmp_path / "data"), str(tmp_path / "registry"))
    finally:
        os.close(live)
    assert _entries(tmp_path / "registry") == [".tmp-v8-live", ".tmp-v9-fresh", "v1"]


def test_a_replica_killed_mid_download_leaves_no_copy_behind_for_long(tmp_path: Path) -> None:
    """A replica killed while downloading a version into the shared cache leaves its ``.tmp-*`` folder; the next
    download there removes it once older than STALE_STAGE_S and held by no one, and leaves a live download's
    (locked) and a fresh one alone, as publishing does for stage folders."""
    import fcntl

    from recfound.serving import registry as reg

    url, cache = f"memory://stale-{tmp_path.name}", tmp_path / "cache"
    try:
        publish_fake(make_artifact(tmp_path / "model"), make_dataset(tmp_path / "data"), url)
        parent = cache / hashlib.sha256(url.encode()).hexdigest()[:16]
        hour_ago = time.time() - 3700
        for name in (".tmp-v1-killed", ".tmp-v1-live", ".tmp-v1-fresh"):
            (parent / name / "weights").mkdir(parents=True)
            (parent / name / "weights" / "adapter.bin").write_bytes(b"partial")
        for name in (".tmp-v1-killed", ".tmp-v1-live"):
            os.utime(parent / name, (hour_ago, hour_ago))
        live = os.open(parent / ".tmp-v1-live", os.O_RDONLY)
        try:
            fcntl.flock(live, fcntl.LOCK_EX | fcntl.LOCK_NB)
            reg.verify(reg.resolve(url, cache_dir=str(cache)))
        finally:
            os.close(live)
        assert sorted(p.name for p in parent.iterdir()) == [".tmp-v1-fresh", ".tmp-v1-live", "v1"]
    finally:
        fsspec.filesystem("memory").rm(f"/stale-{tmp_path.name}", recursive=True)


@pytest.mark.parametrize("fails", [True, False], ids=["then-fails", "then-uploads"])
def test_a_remote_publisher_never_deletes_or_overwrites_a_version_it_did_not_create(
    tmp_path: Path, fails: bool
) -> None:
    """Where claims are not exclusive (a store without conditional writes, an older publisher) another writer may
    commit the claimed vN meanwhile: this publisher must then neither remove it (on failure) nor overwrite it."""
    url, root = f"memory://theirs-{tmp_path.name}", f"/theirs-{tmp_path.name}"
    fs = fsspec.filesystem("memory")
    theirs = json.dumps({"version": "v1", "by": "the other publisher"}).encode()

    def other_commits_v1(version_dir: str) -> None:
        fs.pipe(f"{root}/versions/v1/version.json", theirs)
        if fails:
            raise RuntimeError("out of memory while embedding")

    try:
        with pytest.raises((RuntimeError, RegistryError), match="out of memory|published concurrently"):
            publish(str(make_artifact(tmp_path / "model")), url, other_commits_v1, {"engine": FAKE_ENGINE})
        assert fs.cat(f"{root}/versions/v1/version.json") == theirs
        assert fs.ls(f"{root}/versions/v1", detail=False) == [f"{root}/versions/v1/version.json"]
    finally:
        fs.rm(root, recursive=True)

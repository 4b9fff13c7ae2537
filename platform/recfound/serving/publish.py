"""The model registry, publish side: a merged model and its item index become the next version ``vN`` and
``latest`` follows. The layout and the read side are serving/registry.py's.

A version is visible only once complete. On a local filesystem it is staged under ``versions/.tmp-*``, flushed
to disk (fsync) and renamed into place (one atomic rename). A publisher holds a lock on its stage folder; the
next publish removes stage folders older than ``STALE_STAGE_S`` that no live publisher holds (a crash's
leftovers). Object stores have no directory rename, so there ``version.json`` is uploaded last and is the
commit marker: readers ignore version folders without it.

Concurrent publishers never share a number: each first claims ``vN`` by creating ``versions/.claims/vN``
create-if-absent (an exclusive create locally and on memory://; on object stores it needs conditional writes,
which s3fs and gcsfs map ``xb`` to), retrying with the next number when another publisher holds it. A failed
publish removes only what it uploaded itself, never a version folder that was there before it began (another
writer's, where claims are not exclusive); the number stays used, as a crashed publish's does.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from recfound.artifacts import MANIFEST, hash_tree, verify_tree
from recfound.io import fsync, read_json, sha256, write_json
from recfound.serving.registry import (
    CHECKSUMS,
    CLAIMS,
    LATEST,
    STAGE_PREFIX,
    VERSION_FILE,
    VERSION_NAME,
    VERSIONS,
    ChecksumError,
    RegistryError,
    copy_tree,
    entry_names,
    fs_url,
    locked_stage,
    manifest_files,
    rename_into_place,
    version_dirs,
    version_number,
)

log = logging.getLogger(__name__)

BuildIndex = Callable[[str], None]
"""Writes the item index into a staged, verified local version directory (``version.json`` already there)."""


def publish(
    model_dir: str,
    registry_url: str,
    build_index_fn: BuildIndex,
    meta: Mapping[str, Any] | None = None,
) -> str:
    """Publish a merged model as the next version vN and point ``latest`` at it; returns ``"vN"``.

    ``meta`` (e.g. the engine factory and the instructions) goes into ``version.json``. If anything fails (a
    checksum mismatch, the index build, the upload) the partial version is removed and ``latest`` is untouched.
    """
    fs, root = url_to_fs(registry_url)
    fs.makedirs(f"{root}/{VERSIONS}", exist_ok=True)
    name = _claim_version(fs, root)
    info = {**(meta or {}), "version": name, "source": model_dir, "created": time.time()}
    if isinstance(fs, LocalFileSystem):
        _publish_local(model_dir, Path(root) / VERSIONS, info, build_index_fn)
    else:
        _publish_remote(model_dir, fs, f"{root}/{VERSIONS}/{name}", info, build_index_fn)
    _advance_latest(fs, root, name)
    log.info("published %s to %s", name, registry_url)
    return name


def _publish_local(model_dir: str, versions: Path, info: dict[str, Any], build_index_fn: BuildIndex) -> None:
    """Stage inside ``versions`` (one filesystem, so the committing rename is atomic), locked while this publisher
    works there, and on disk before the rename: after a power cut a committed version has all its bytes."""
    with locked_stage(versions, info["version"]) as stage:
        _stage(model_dir, stage, info, build_index_fn)
        _fsync_tree(stage)
        rename_into_place(stage, str(versions / info["version"]))
        fsync(versions)


def _publish_remote(model_dir: str, fs: Any, final: str, info: dict[str, Any], build_index_fn: BuildIndex) -> None:
    """Stage in a local temp folder, then upload. A failure removes ``final`` only once this publisher began
    uploading into it; a ``final`` that exists before then is another writer's and is neither touched nor
    overwritten (claims are exclusive only where the store honours create-if-absent)."""
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{info['version']}-"))
    began = False
    try:
        _stage(model_dir, stage, info, build_index_fn)
        if fs.exists(final):
            raise RegistryError(f"{fs_url(fs, final)} exists already (published concurrently?); left as it is")
        began = True
        _upload(stage, fs, final)
    except BaseException:
        if began and fs.exists(final):
            fs.rm(final, recursive=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Every file and folder under ``root``, deepest first and ``root`` last, flushed to disk."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [root]:
        fsync(path)


def _claim_version(fs: Any, root: str) -> str:
    """Reserve the next free ``vN`` with a create-if-absent marker, so two publishers never both write it."""
    claims = f"{root}/{VERSIONS}/{CLAIMS}"
    fs.makedirs(claims, exist_ok=True)
    while True:
        taken = version_dirs(fs, root) + [n for n in entry_names(fs, claims) if VERSION_NAME.match(n)]
        name = f"v{max(map(version_number, taken), default=0) + 1}"
        try:
            with fs.open(f"{claims}/{name}", "xb") as handle:
                handle.write(json.dumps({"pid": os.getpid(), "claimed": time.time()}).encode())
        except FileExistsError:
            continue  # another publisher took it between our listing and our create
        return name


def _stage(model_dir: str, stage: Path, info: dict[str, Any], build_index_fn: BuildIndex) -> None:
    """Copy and verify the artifact into ``stage``, build the index there, and record everything's checksum."""
    copy_tree(model_dir, stage)
    manifest = manifest_files(stage)
    for reserved in (VERSION_FILE, CHECKSUMS):
        if reserved in manifest:
            raise RegistryError(f"{model_dir}: {reserved} is reserved for the registry's own record")
    try:
        verify_tree(stage, manifest, listed_in=MANIFEST, error=ChecksumError, unlisted_ok=False, skip={MANIFEST})
    except ChecksumError as err:  # name the artifact the user gave, not the temporary copy
        raise ChecksumError(str(err).replace(str(stage), model_dir)) from None
    (stage / VERSION_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    build_index_fn(str(stage))
    info["index_files"] = hash_tree(stage, skip={*manifest, MANIFEST, VERSION_FILE})
    (stage / VERSION_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    # Everything else was checked or hashed above: only the two records need hashing now.
    sealed = {**manifest, **info["index_files"], **{f: sha256(str(stage / f)) for f in (MANIFEST, VERSION_FILE)}}
    (stage / CHECKSUMS).write_text(json.dumps({"files": sealed}, indent=2, sort_keys=True))


def _relpaths(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _upload(stage: Path, fs: Any, final: str) -> None:
    """Upload with ``version.json`` last: on object stores it is the commit marker readers look for."""
    for rel in _relpaths(stage):
        if rel != VERSION_FILE:
            fs.makedirs(f"{final}/{rel}".rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(stage / rel), f"{final}/{rel}")
    fs.put_file(str(stage / VERSION_FILE), f"{final}/{VERSION_FILE}")


def _advance_latest(fs: Any, root: str, name: str) -> None:
    """Point ``latest`` at the newest complete version, checking again after each write: a concurrent publisher
    of an older number may have overwritten a newer pointer between its check and its write. The last check
    of all publishers comes after every write and every commit, so it leaves the newest version in place."""
    pointer = f"{root}/{LATEST}"
    while True:
        newest = max(
            (n for n in version_dirs(fs, root) if fs.exists(f"{root}/{VERSIONS}/{n}/{VERSION_FILE}")),
            key=version_number,
            default=name,
        )
        if fs.exists(pointer) and version_number(read_json(fs_url(fs, pointer))["version"]) >= version_number(newest):
            return
        write_json(fs_url(fs, pointer), {"version": newest, "updated": time.time()})

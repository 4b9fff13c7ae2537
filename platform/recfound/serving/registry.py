"""The model registry, read side: numbered, checksummed, immutable versions of a merged model plus its item index,
found, fetched and verified for serving; and the staging folders both sides write through. Publishing a version is
serving/publish.py's.

Layout at any fsspec URL (local directory, memory://, s3://, ...)::

    <registry>/latest.json            {"version": "v2"}: the pointer serving follows, replaced atomically
    <registry>/versions/v1/           a complete version (has version.json), never modified after publish
        manifest.json                 from the merge job: {"files": {relpath: sha256}, ...}
        <artifact files>              the merged model, exactly as listed in manifest.json
        index/...                     the item index (see recfound.serving.index)
        version.json                  {"version", "engine", "instructions", "index_files": {relpath: sha256}, ...}
        checksums.json                {"files": {relpath: sha256}} of every other file, version.json included

``verify`` checks every file against ``checksums.json`` and refuses unlisted ones: ``version.json`` names the
engine factory serving imports, so it is as tamper-evident as the weights.

A version is visible only once complete: readers ignore version folders without ``version.json``. A remote version
is downloaded into a local cache through a locked stage folder (``locked_stage``) and renamed into place, as a
local publish stages its version; stage folders a killed writer left are removed once older than ``STALE_STAGE_S``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from recfound.artifacts import MANIFEST, verify_tree
from recfound.io import read_json

log = logging.getLogger(__name__)
VERSIONS = "versions"
CLAIMS = ".claims"
LATEST = "latest.json"
VERSION_FILE = "version.json"
CHECKSUMS = "checksums.json"
STAGE_PREFIX = ".tmp-"
STALE_STAGE_S = 3600.0
"""A stage folder older than this (seconds) and held by no publisher is a crashed publish's, removed at the next."""
LATEST_ALIAS = "latest"
CACHE_ENV = "RECFOUND_CACHE"
VERSION_NAME = re.compile(r"^v([1-9][0-9]*)$")


class RegistryError(RuntimeError):
    """The registry cannot do what was asked; the message says why."""


class VersionNotFound(RegistryError):
    """No complete version of that name (or no ``latest`` yet)."""


class ChecksumError(RegistryError):
    """An artifact's files do not match their recorded SHA-256: corrupted, truncated or tampered with."""


def version_number(name: str) -> int:
    """The N of ``vN``; anything else (paths, typos) is rejected before it can touch the filesystem."""
    match = VERSION_NAME.match(name)
    if match is None:
        raise VersionNotFound(f"invalid version name {name!r}: expected v1, v2, ... or {LATEST_ALIAS!r}")
    return int(match.group(1))


def list_versions(registry_url: str) -> list[str]:
    """Complete versions, oldest first."""
    fs, root = url_to_fs(registry_url)
    return [name for name in version_dirs(fs, root) if fs.exists(f"{root}/{VERSIONS}/{name}/{VERSION_FILE}")]


def latest_version(registry_url: str) -> str:
    """The version ``latest`` points at: what serving loads when no version is named."""
    fs, root = url_to_fs(registry_url)
    pointer = f"{root}/{LATEST}"
    if not fs.exists(pointer):
        raise VersionNotFound(f"registry {registry_url} has no published version yet (no {LATEST})")
    return str(read_json(fs_url(fs, pointer))["version"])


def read_version(version_dir: str) -> dict[str, Any]:
    """The ``version.json`` of a local version directory."""
    return json.loads((Path(version_dir) / VERSION_FILE).read_text())


def verify(version_dir: str) -> None:
    """Check every file of a local version directory against ``checksums.json`` and refuse files it does not list.

    Serving calls this before loading, so a version corrupted after publish is refused rather than served; that
    covers ``version.json``, whose engine factory is imported only after this passed.
    """
    root = Path(version_dir)
    if not (root / VERSION_FILE).is_file():
        raise ChecksumError(f"{version_dir}: no {VERSION_FILE}, not a complete version")
    sealed = _sealed_files(root)
    # Before version.json and manifest.json are read below.
    verify_tree(root, sealed, listed_in=CHECKSUMS, error=ChecksumError, unlisted_ok=False, skip={CHECKSUMS})
    recorded = {**manifest_files(root), **read_version(version_dir).get("index_files", {})}
    disagree = sorted(rel for rel, digest in recorded.items() if sealed.get(rel) != digest)
    if disagree:
        raise ChecksumError(
            f"{version_dir}: checksum mismatch for {disagree[0]}: {CHECKSUMS} disagrees with "
            f"{MANIFEST} or {VERSION_FILE}"
        )


def _sealed_files(root: Path) -> dict[str, str]:
    """The digests ``checksums.json`` records; a version without it predates sealing and is refused."""
    path = root / CHECKSUMS
    if not path.is_file():
        raise ChecksumError(f"{root}: no {CHECKSUMS} (published by an older release?): publish the model again")
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise ChecksumError(f"{path}: unreadable ({err!r})") from None
    if not isinstance(files, dict) or VERSION_FILE not in files:
        raise ChecksumError(f"{path}: expected a 'files' mapping that includes {VERSION_FILE}")
    return {str(k): str(v) for k, v in files.items()}


def resolve(registry_url: str, version: str = LATEST_ALIAS, cache_dir: str | None = None) -> str:
    """A local directory holding the complete version (``latest`` follows the pointer).

    Local registries are read in place; remote ones are downloaded once into ``cache_dir`` (default
    ``$RECFOUND_CACHE`` or ``~/.cache/recfound/registry``), by temp name + rename so a crash leaves no half copy.
    """
    name = latest_version(registry_url) if version == LATEST_ALIAS else version
    version_number(name)
    fs, root = url_to_fs(registry_url)
    remote_dir = f"{root}/{VERSIONS}/{name}"
    if not fs.exists(f"{remote_dir}/{VERSION_FILE}"):
        known = ", ".join(list_versions(registry_url)) or "none"
        raise VersionNotFound(f"no version {name} in registry {registry_url} (versions: {known})")
    if isinstance(fs, LocalFileSystem):
        return remote_dir
    base = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "recfound" / "registry")
    dest = base / hashlib.sha256(registry_url.encode()).hexdigest()[:16] / name
    if (dest / VERSION_FILE).is_file():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with locked_stage(dest.parent, name) as tmp:
        try:
            copy_tree(fs_url(fs, remote_dir), tmp)
            rename_into_place(tmp, str(dest))
        except RegistryError:
            if not (dest / VERSION_FILE).is_file():  # losing the rename to a concurrent download is success
                raise
    return str(dest)


def resolve_verified(registry_url: str, version: str = LATEST_ALIAS, cache_dir: str | None = None) -> str:
    """``resolve`` then ``verify``; a cached copy of a remote version that fails (a disk error, a torn copy by
    an older release) is dropped and fetched again once, instead of being refused forever."""
    path = resolve(registry_url, version, cache_dir)
    try:
        verify(path)
    except ChecksumError as err:
        fs, root = url_to_fs(registry_url)
        if isinstance(fs, LocalFileSystem):
            raise  # the registry itself is damaged: nothing to fetch again
        log.warning("cached copy fails verification, fetching it again: %s", err)
        shutil.rmtree(path, ignore_errors=True)
        path = resolve(registry_url, version, cache_dir)
        verify(path)
    return path


def fs_url(fs: Any, path: str) -> str:
    """``path`` of ``fs`` as a full URL again (``url_to_fs`` strips the protocol), for the io helpers and messages."""
    return fs.unstrip_protocol(path)


def version_dirs(fs: Any, root: str) -> list[str]:
    """Every vN folder, complete or not, by number: numbering must skip partial ones a crash left behind."""
    if not fs.exists(f"{root}/{VERSIONS}"):
        return []
    names = entry_names(fs, f"{root}/{VERSIONS}")
    return sorted((n for n in names if VERSION_NAME.match(n)), key=version_number)


def entry_names(fs: Any, folder: str) -> list[str]:
    """The names directly in ``folder``: object stores list full keys, some with a trailing slash."""
    return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)]


def manifest_files(root: Path) -> dict[str, str]:
    """The merge job's record of the artifact's files, refused when absent or empty: nothing unrecorded is served."""
    path = root / MANIFEST
    if not path.is_file():
        raise ChecksumError(f"{root}: no {MANIFEST}; the merge job writes it with the SHA-256 of every file")
    files = json.loads(path.read_text()).get("files")
    if not isinstance(files, dict) or not files:
        raise ChecksumError(f"{path}: expected a non-empty 'files' mapping of relative path to SHA-256")
    return {str(k): str(v) for k, v in files.items()}


@contextlib.contextmanager
def locked_stage(parent: Path, version: str) -> Iterator[Path]:
    """A fresh temp folder in ``parent`` for ``version``, locked while its writer (a publisher or a downloading
    replica) works in it and removed afterwards. Folders that writers killed mid-way left behind are removed
    first (``_remove_stale_stages``): a SIGKILL runs no cleanup."""
    _remove_stale_stages(parent)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{version}-", dir=parent))
    lock = os.open(stage, os.O_RDONLY)
    try:
        _try_lock(lock)  # a fresh, randomly named folder: no one else can hold it yet
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        os.close(lock)


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on the open folder ``fd`` without waiting; False if another process holds it.
    A filesystem without locks counts as unlocked: the stage's age alone then protects a live publisher."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def _remove_stale_stages(parent: Path) -> None:
    """Remove stage folders a crashed writer left: older than ``STALE_STAGE_S`` and locked by no one. A live
    writer holds its stage's lock until after its rename, so its folder is never taken however old."""
    cutoff = time.time() - STALE_STAGE_S
    for stage in parent.glob(f"{STAGE_PREFIX}*"):
        try:
            if not stage.is_dir() or stage.stat().st_mtime >= cutoff:
                continue
            fd = os.open(stage, os.O_RDONLY)
        except FileNotFoundError:
            continue  # committed or removed meanwhile
        try:
            if _try_lock(fd):
                log.warning("removing %s: a stage folder older than %.0f s that no writer holds", stage, STALE_STAGE_S)
                shutil.rmtree(stage, ignore_errors=True)
        finally:
            os.close(fd)


def copy_tree(src_url: str, dest: Path) -> None:
    """Copy every file under ``src_url`` (any fsspec URL) into the local directory ``dest``, file by file."""
    fs, src = url_to_fs(src_url)
    src = src.rstrip("/")
    files = fs.find(src)
    if not files:
        raise RegistryError(f"{src_url}: no files to publish")
    relpaths = [_inside(src_url, src, path) for path in files]  # every one checked before the first write
    for path, rel in zip(files, relpaths, strict=True):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(target))


def _inside(src_url: str, src: str, path: str) -> str:
    """``path`` relative to ``src``, refused unless plainly inside it: object-store keys are arbitrary strings,
    so a listing may yield ``v1/../../x`` or ``v1//etc/x``, which would otherwise land outside the destination."""
    rel = path[len(src) + 1 :] if path.startswith(f"{src}/") else ""
    if not rel or any(part in ("", ".", "..") for part in rel.split("/")):
        raise RegistryError(f"{src_url}: refusing to copy {path!r}: not a plain relative path inside it")
    return rel


def rename_into_place(stage: Path, final: str) -> None:
    """Commit a complete stage folder with one atomic rename; losing it to another writer is a ``RegistryError``."""
    try:
        os.rename(stage, final)
    except OSError as err:
        raise RegistryError(f"cannot move {stage} to {final} (published concurrently?): {err}") from err

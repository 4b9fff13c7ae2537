"""Storage through fsspec: local paths, s3://, gs://, memory:// and gzip, all read and written the same way."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO

import fsspec
from fsspec.core import has_magic, url_to_fs
from fsspec.implementations.local import LocalFileSystem

DUMP_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")
"""The files a directory given as input contributes: a dump's JSON-lines shards, not the README, checksum list or
``_SUCCESS`` marker that often sit next to them."""


class NoInputFiles(ValueError):
    """An input (file, directory, glob or comma list) that names no file to read; the message names the part."""


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def expand(spec: str) -> list[str]:
    """The files an input names, each once, sorted: a file, a directory (its ``DUMP_SUFFIXES`` files, recursively), a
    glob, or a comma-separated list of these. Sorted so that shards are read in the same order however they are
    named; a part naming nothing is an error before any file is read, so a typo never builds from half a dump."""
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if not parts:
        raise NoInputFiles(f"no file given: {spec!r}")
    found: dict[str, str] = {}
    for part in parts:
        for key, url in _expand_part(part):
            found.setdefault(key, url)
    return [found[key] for key in sorted(found)]


def _expand_part(part: str) -> list[tuple[str, str]]:
    """(canonical URL, URL to read) of each file one part names. A plain file is read by the name it was given, so a
    single-file input reads and reports exactly as before; the canonical URL lets a file named twice be read once."""
    fs, path = url_to_fs(part)
    if has_magic(path):
        files = [f for match in fs.glob(path) for f in _files_under(fs, match)]
        nothing = f"no file matches {part}"
    elif fs.isdir(path):
        files = _files_under(fs, path)
        nothing = f"no {', '.join('*' + s for s in DUMP_SUFFIXES)} file in directory {part}"
    elif fs.isfile(path):
        return [(_canonical(fs, path), part)]
    else:
        raise NoInputFiles(f"no such file or directory: {part}")
    if not files:
        raise NoInputFiles(nothing)
    return [(_canonical(fs, f), _canonical(fs, f)) for f in files]


def _files_under(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """A directory's dump files at any depth, or the path itself when it is a file."""
    return [f for f in fs.find(path) if f.endswith(DUMP_SUFFIXES)] if fs.isdir(path) else [path]


def _canonical(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URL fsspec opens again: local paths stay plain (absolute), others get their protocol back."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def open_binary(url: str) -> BinaryIO:
    """Open for reading, decompressing ``.gz`` (by magic bytes, so a mislabelled file still reads)."""
    raw = fsspec.open(url, "rb").open()
    head = raw.read(2)
    raw.seek(0)
    return gzip.GzipFile(fileobj=raw) if head == b"\x1f\x8b" else raw


def iter_lines(url: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for each non-blank line."""
    with open_binary(url) as handle:
        for number, line in enumerate(io.TextIOWrapper(handle, encoding="utf-8"), start=1):
            if line.strip():
                yield number, line


def sha256(url: str) -> str:
    digest = hashlib.sha256()
    with fsspec.open(url, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(url: str, obj: Any) -> None:
    """Write JSON so a reader never sees half a file: write a sibling temp file, then move it into place. Locally
    the file is flushed to disk before the move and the folder after it: otherwise a power cut can leave the new
    name pointing at an empty file (e.g. the registry's ``latest`` pointer)."""
    fs, path = url_to_fs(url)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # unique: two writers must not share (and move away) one temp file
    with fs.open(tmp, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)
    local = isinstance(fs, LocalFileSystem)
    if local:
        fsync(tmp)
    fs.mv(tmp, path)
    if local:
        fsync(os.path.dirname(path))


def fsync(path: str | os.PathLike[str]) -> None:
    """Flush a local file's or folder's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(url: str) -> Any:
    with fsspec.open(url, "r") as handle:
        return json.load(handle)

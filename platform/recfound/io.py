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
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


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

"""A local cache of the SmolLM2 GGUF converted to transformers' own files, so only a machine's first load pays
for the conversion.

Loading SmolLM2-135M from its GGUF parses the metadata in pure Python and dequantises every tensor: 16.9 s for
model + tokenizer and 3.7 s for the tokenizer alone on 2 cores, against 0.23 s and 0.29 s from the saved
transformers files (measured 2026-12-04, same logits and token ids). Every process that needs the backbone
pays it again — each Ray Data tokenisation worker, each training worker, every evaluated system, each Serve
replica — so the conversion is kept on disk, keyed by the GGUF file's name and content digest (0.3 s to hash its
98 MB, once per process): a reinstall of the same package (every fresh virtual environment, every CI clone) reuses
the conversion, where a key on the file's modification time left a new 517 MB copy behind each time.

Each part (``model``, ``tokenizer``) is written into a fresh folder beside its place and renamed into it, with
a marker file written last: a reader sees a whole conversion or none, and of two processes converting at once
the second rename loses harmlessly. Where the cache cannot be written (a read-only home on a node), the load
goes on from the GGUF file with a warning. ``RECFOUND_CACHE`` moves the cache (default ``~/.cache/recfound``).
This module imports neither torch nor transformers: the tokenisation workers use it too.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "RECFOUND_CACHE"
COMPLETE = "converted.ok"
"""Written last into a converted part: a folder without it is ignored (and replaced)."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "recfound")


def converted(source: Path, part: str, write: Callable[[Path], None]) -> Path | None:
    """The folder holding ``part`` of ``source`` converted by ``write`` (called with an empty folder to fill) —
    converted now if no whole conversion exists — or None when the cache cannot be written."""
    stat = source.stat()
    target = cache_root() / f"{source.stem}-{_digest(str(source), stat.st_size, stat.st_mtime_ns)}" / part
    if (target / COMPLETE).is_file():
        return target
    stage = target.parent / f".{part}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        stage.mkdir(parents=True)
        write(stage)
        (stage / COMPLETE).write_text(str(source))
        if target.exists():  # a conversion that never completed
            shutil.rmtree(target, ignore_errors=True)
        try:
            stage.rename(target)
        except OSError:
            if not (target / COMPLETE).is_file():  # losing the race to a whole conversion is success
                raise
    except OSError as err:
        log.warning(
            "cannot cache the converted %s of %s in %s (%s); loading from the GGUF file each time",
            part,
            source.name,
            target.parent,
            err,
        )
        return None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


@functools.cache
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """The file's content digest, computed once per process and version of the file (size and mtime in the key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]

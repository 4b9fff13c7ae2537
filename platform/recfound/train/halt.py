"""Why a run stopped on purpose (a NaN loss, non-finite gradients), kept beside its checkpoints.

The workers return normally on such a stop (raising would make Ray Train retry from the last checkpoint into
the same deterministic failure), so the driver learns of it from this record. It lives in the run's storage,
not in an actor's memory: an actor restart cannot turn a stopped run into a reported success.
"""

from __future__ import annotations

import posixpath

from fsspec.core import url_to_fs

from recfound.io import read_json, write_json

HALT_FILE = "halted.json"


def halt_url(storage_path: str, run: str) -> str:
    return posixpath.join(storage_path.rstrip("/"), run, HALT_FILE)


def record_halt(url: str, step: int, reason: str) -> None:
    fs, path = url_to_fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)  # a stop before the first checkpoint: no run folder yet
    write_json(url, {"step": step, "reason": reason})


def read_halt(url: str) -> str | None:
    """The recorded reason, or None when the run was not stopped on purpose."""
    fs, path = url_to_fs(url)
    return str(read_json(url)["reason"]) if fs.exists(path) else None


def clear_halt(url: str) -> None:
    """Forget an earlier attempt's stop: a re-run (e.g. with a fixed config) resumes and decides afresh."""
    fs, path = url_to_fs(url)
    if fs.exists(path):
        fs.rm(path)

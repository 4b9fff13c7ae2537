"""The file layout of what the platform writes — training checkpoints, merged models, exports, registry versions —
and the one way their SHA-256 manifests are made and checked.

As peft keeps its file names in one constants module, a name here changes everywhere at once; every writer hashes
with ``hash_tree`` and every reader checks with ``verify_tree``, raising its own error type (a torn checkpoint and
a tampered registry version are different failures to the user) with the same wording.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from recfound.io import sha256

ADAPTER_DIR = "adapter"
"""The TMoLE adapter (peft layout) inside a checkpoint, a merged model or a registry version."""
TOKENIZER_DIR = "tokenizer"
TRAINER_STATE = "trainer_state.json"
"""A checkpoint's step, stream positions, sampling carry, seed and world size."""
SCHEDULER_STATE = "s2sched.json"
METRICS = "metrics.jsonl"
"""Rank 0's per-step telemetry records so far (one JSON object per line)."""
CHECKPOINT_MANIFEST = "checkpoint.json"
"""A training checkpoint's SHA-256 list, written last: its absence marks a checkpoint that never completed."""
MANIFEST = "manifest.json"
"""The SHA-256 list (and provenance) of a merged model, an export or a built dataset, written last."""


def hash_tree(root: Path, skip: Collection[str] = ()) -> dict[str, str]:
    """Relative POSIX path -> SHA-256 of every file under ``root``, except those named in ``skip``."""
    return {
        rel: sha256(str(path))
        for path in sorted(root.rglob("*"))
        if path.is_file() and (rel := path.relative_to(root).as_posix()) not in skip
    }


def verify_tree(
    root: Path,
    files: Mapping[str, str],
    *,
    listed_in: str,
    error: type[Exception],
    unlisted_ok: bool = True,
    skip: Collection[str] = (),
) -> None:
    """Raise ``error`` unless every file in ``files`` lies inside ``root``, exists and has its SHA-256, and
    (``unlisted_ok=False``) no file outside ``skip`` is unlisted. Paths are confined before any file is read: a
    manifest is input, and ``../x`` must not name a file elsewhere."""
    base = root.resolve()
    for rel, digest in sorted(files.items()):
        path = root / rel
        if not path.resolve().is_relative_to(base):
            raise error(f"{root}: listed file {rel!r} lies outside the artifact")
        if not path.is_file():
            raise error(f"{root}: {rel} is listed in {listed_in} but missing")
        if sha256(str(path)) != digest:
            raise error(f"{root}: {rel} does not match its SHA-256 in {listed_in}")
    if not unlisted_ok:
        present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
        unlisted = sorted(present - set(files) - set(skip))
        if unlisted:
            raise error(f"{root}: files not listed in {listed_in}: {', '.join(unlisted[:5])}")


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, or of the one inside checkpoint directory ``path``."""
    file = path / METRICS if path.is_dir() else path
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]

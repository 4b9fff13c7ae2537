"""The file layout of what the platform writes — training checkpoints, merged models, exports, registry versions —
and the one way their SHA-256 manifests are made and checked.

As peft keeps its file names in one constants module, a name here changes everywhere at once; every writer hashes
with ``hash_tree`` and every reader checks with ``verify_tree``, raising its own error type (a torn checkpoint and
a tampered registry version are different failures to the user) with the same wording.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
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
TENSORBOARD_DIR = "tensorboard"
"""Rank 0's TensorBoard event files, in the run's folder of its storage path (``<storage_path>/<name>/tensorboard``)."""
MANIFEST = "manifest.json"
"""The SHA-256 list (and provenance) of a merged model, an adapted model or an export, written last. (A built
dataset's manifest is ``tasks.DATASET_MANIFEST``.)"""
EXPORT_KIND = "recfound-export"
"""``kind`` in an export's manifest (jobs/export.py): one task, folded, no adapter."""
ADAPTED_KIND = "adapted"
"""``kind`` in an adapted model's manifest (jobs/adapt.py): a merged model's layout with new task rows."""


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


def read_manifest(root: Path, error: type[Exception]) -> dict[str, Any]:
    """A merged model's, adaptation's or export's manifest as a JSON object; ``error`` names what is wrong."""
    path = root / MANIFEST
    if not path.is_file():
        checkpoint = (root / CHECKPOINT_MANIFEST).is_file()
        hint = " (a training checkpoint: merge it first with jobs/merge.py)" if checkpoint else ""
        raise error(f"{root}: no {MANIFEST}, not a merged artifact or export{hint}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise error(f"{path}: not JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise error(f"{path}: expected a JSON object")
    return manifest


def check_files(root: Path, files: Any, error: type[Exception], unlisted_ok: bool) -> None:
    """Every file the manifest lists present with its SHA-256; unless ``unlisted_ok``, no file that it omits."""
    if not isinstance(files, dict) or not files:
        raise error(f"{root / MANIFEST}: expected a non-empty 'files' mapping of relative path to SHA-256")
    verify_tree(root, files, listed_in=MANIFEST, error=error, unlisted_ok=unlisted_ok, skip={MANIFEST})


def read_merged(root: Path, error: type[Exception]) -> dict[str, Any]:
    """The manifest of a merged (or adapted) model at ``root`` once every file it lists verifies; an export, a
    checkpoint or a bare directory is refused naming what to pass instead."""
    if not root.is_dir():
        raise error(f"model={root}: not a local directory")
    manifest = read_manifest(root, error)
    if manifest.get("kind") == EXPORT_KIND:
        origin = manifest.get("source", {}).get("model")
        raise error(
            f"model={root}: is an export ({manifest.get('task')}), not a merged artifact; "
            f"use the merged directory it came from: {origin}"
        )
    if not (root / ADAPTER_DIR).is_dir():
        raise error(f"model={root}: not a merged artifact (no {ADAPTER_DIR}/); merge with jobs/merge.py first")
    check_files(root, manifest.get("files"), error, unlisted_ok=True)
    return manifest


def check_out(out: Path, source: Path, kind: str, error: type[Exception]) -> None:
    """Never write over the source, into it, or over a directory that is not an earlier output of ``kind``."""
    src, dst = source.resolve(), out.resolve()
    if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
        raise error(f"out={out}: must lie outside model={source} (and not contain it)")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and _kind(out) != kind)):
        raise error(
            f"out={out}: exists and is not an earlier output of this job (manifest kind {kind!r}); "
            "refusing to overwrite it"
        )


def _kind(path: Path) -> Any:
    try:
        return json.loads((path / MANIFEST).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh directory beside ``out`` to write into; moved into place (replacing ``out``) when the block ends
    without error, removed otherwise: ``out`` never holds half an artifact."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise

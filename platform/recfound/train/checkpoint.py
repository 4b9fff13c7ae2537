"""Training checkpoints: everything a resumed run needs, and a manifest written last so a torn one is refused.

Layout of a checkpoint directory:
  adapter/            TMoLE weights (safetensors) + adapter_config.json, loadable by ``GRM.from_pretrained``
  optimizer.pt | zero/  optimizer + LR-schedule state as the run's engine writes it (train/engine.py)
  trainer_state.json  step, per-task stream positions, sampling carry, seed, world size (no RNG state: each
                      step seeds dropout from seed, rank and step)
  s2sched.json        S2Sched state: step, per-task loss histories, weights history
  metrics.jsonl       rank 0's per-step records so far
  checkpoint.json     SHA-256 of every file above; written last, so its presence means the rest is complete

A write that fails (disk full, read-only storage, no permission) raises CheckpointWriteError naming the file and
the cause; the manifest is then never written, so the partial checkpoint is never resumed from, and a torn or
unreadable manifest counts as corrupt rather than stopping the resume.

A resume starts from the newest checkpoint that verifies (``resumable``), not blindly from the one Ray Train
registered last: bytes flipped in that one on storage would otherwise fail every resume while an older
checkpoint is intact.
"""

from __future__ import annotations

import errno
import json
import logging
import posixpath
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recfound.artifacts import (
    ADAPTER_DIR,
    CHECKPOINT_MANIFEST,
    METRICS,
    SCHEDULER_STATE,
    TRAINER_STATE,
    hash_tree,
    read_metrics,
    read_trainer_state,
    verify_tree,
)
from recfound.model.grm import GRM
from recfound.train.telemetry import write_history

if TYPE_CHECKING:
    from ray.train import Checkpoint

PREFIX = "checkpoint_"
"""Ray Train's checkpoint directory names; they sort by creation time."""

log = logging.getLogger(__name__)


class CorruptCheckpointError(RuntimeError):
    """A checkpoint without its manifest (half-written) or whose files do not match it."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (disk full, read-only or no permission); the message names the path and cause."""


@contextmanager
def writing(where: str | Path) -> Iterator[None]:
    """An OSError inside becomes CheckpointWriteError naming the file (``where`` when the error names none) and
    the cause: a full disk otherwise surfaces as a bare ``[Errno 28]`` from a worker, no file named."""
    try:
        yield
    except OSError as err:
        code = errno.errorcode.get(err.errno or 0)
        cause = f"{err.strerror} [{code}]" if err.strerror and code else str(err)
        raise CheckpointWriteError(
            f"checkpoint not written: {err.filename or where}: {cause}; the last complete "
            f"checkpoint stays and a resume starts from it"
        ) from err


def save(
    root: Path, grm: GRM, trainer_state: dict[str, Any], scheduler_state: dict[str, Any], history: list[dict]
) -> None:
    """Rank 0's part, after the engine wrote its optimizer state into ``root``; the manifest covers both."""
    with writing(root / ADAPTER_DIR):
        grm.save_pretrained(str(root / ADAPTER_DIR))
    for name, text in (
        (TRAINER_STATE, json.dumps(trainer_state, indent=2)),
        (SCHEDULER_STATE, json.dumps(scheduler_state)),
    ):
        with writing(root / name):
            (root / name).write_text(text)
    with writing(root / METRICS):
        write_history(history, root / METRICS)
    with writing(root / CHECKPOINT_MANIFEST):
        files = hash_tree(root, skip={CHECKPOINT_MANIFEST})
        (root / CHECKPOINT_MANIFEST).write_text(json.dumps({"files": files}, indent=2, sort_keys=True))


def verify(root: Path) -> None:
    """Raise CorruptCheckpointError unless every file listed in the manifest is present and unchanged."""
    manifest = root / CHECKPOINT_MANIFEST
    if not manifest.is_file():
        raise CorruptCheckpointError(f"{root}: no {CHECKPOINT_MANIFEST}; the checkpoint was never completed")
    try:
        expected = dict(json.loads(manifest.read_text())["files"])
    except (ValueError, KeyError, TypeError) as err:  # torn by a failed write: corrupt, like a missing file
        raise CorruptCheckpointError(f"{root}: {CHECKPOINT_MANIFEST} is unreadable ({err!r})") from None
    verify_tree(root, expected, listed_in=CHECKPOINT_MANIFEST, error=CorruptCheckpointError)


def _older_or_same(latest: Checkpoint) -> list[Checkpoint]:
    """``latest`` and the checkpoints beside it in its run directory that are older, newest first. Newer ones
    are left out: Ray Train never registered them (an upload whose round of reports did not complete)."""
    from pyarrow.fs import FileSelector, FileType
    from ray.train import Checkpoint

    parent, name = posixpath.split(latest.path.rstrip("/"))
    infos = latest.filesystem.get_file_info(FileSelector(parent))
    older = sorted(
        (
            i.base_name
            for i in infos
            if i.type == FileType.Directory and i.base_name.startswith(PREFIX) and i.base_name < name
        ),
        reverse=True,
    )
    return [latest] + [Checkpoint(posixpath.join(parent, n), latest.filesystem) for n in older]


def _check_local(candidate: Checkpoint, check: Callable[[Path], None]) -> None:
    """``check`` on the candidate's files, downloaded first when the storage is remote; the error then names
    where the checkpoint is stored, not the temporary download."""
    with candidate.as_directory() as local:
        try:
            check(Path(local))
        except CorruptCheckpointError as err:
            raise CorruptCheckpointError(str(err).replace(local, candidate.path)) from None


def resumable(latest: Checkpoint, check: Callable[[Path], None]) -> Checkpoint:
    """The newest of ``latest`` (the checkpoint Ray Train restores) and its older siblings that passes ``check``;
    a warning names each newer one skipped and why. None passing is a CorruptCheckpointError naming them all."""
    skipped: list[str] = []
    for candidate in _older_or_same(latest):
        try:
            _check_local(candidate, check)
        except CorruptCheckpointError as err:
            skipped.append(str(err))
            continue
        if skipped:
            log.warning(
                "resuming from %s; skipped newer checkpoints that do not verify: %s", candidate.path, "; ".join(skipped)
            )
        return candidate
    raise CorruptCheckpointError(f"no checkpoint of the run verifies: {'; '.join(skipped)}")


def load_state(root: Path, grm: GRM) -> tuple[dict[str, Any], dict[str, Any], list[dict]]:
    """Restore the adapter in place; return (trainer_state, scheduler_state, history). The engine, built on the
    restored adapter, then loads its optimizer state from the same directory."""
    verify(root)
    grm.tuner.load_pretrained(str(root / ADAPTER_DIR))
    return read_trainer_state(root), json.loads((root / SCHEDULER_STATE).read_text()), read_metrics(root)


def load_model(root: str) -> GRM:
    """The trained model of a verified checkpoint (or of a bare adapter directory)."""
    path = Path(root)
    if (path / ADAPTER_DIR).is_dir():
        verify(path)
        path = path / ADAPTER_DIR
    return GRM.from_pretrained(str(path))

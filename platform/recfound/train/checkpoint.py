"""Training checkpoints: everything a resumed run needs, and a manifest written last so a torn one is refused.

Layout of a checkpoint directory:
  adapter/            TMoLE weights (safetensors) + adapter_config.json, loadable by ``GRM.from_pretrained``
  optimizer.pt | zero/  optimizer + LR-schedule state as the run's engine writes it (train/engine.py)
  trainer_state.json  step, per-task stream positions, sampling carry, seed, world size (no RNG state: each
                      step seeds dropout from seed, rank and step)
  s2sched.json        S2Sched state: step, per-task loss histories, weights history
  metrics.jsonl       rank 0's per-step records so far
  checkpoint.json     SHA-256 of every file above; written last, so its presence means the rest is complete
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recfound.io import sha256
from recfound.model.grm import GRM
from recfound.train.telemetry import write_history

MANIFEST = "checkpoint.json"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint without its manifest (half-written) or whose files do not match it."""


def _hash_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256(str(p)) for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def save(
    root: Path, grm: GRM, trainer_state: dict[str, Any], scheduler_state: dict[str, Any], history: list[dict]
) -> None:
    """Rank 0's part, after the engine wrote its optimizer state into ``root``; the manifest covers both."""
    grm.save_pretrained(str(root / "adapter"))
    (root / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    (root / "s2sched.json").write_text(json.dumps(scheduler_state))
    write_history(history, root / "metrics.jsonl")
    (root / MANIFEST).write_text(json.dumps({"files": _hash_tree(root)}, indent=2, sort_keys=True))


def verify(root: Path) -> None:
    """Raise CorruptCheckpointError unless every file listed in the manifest is present and unchanged."""
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise CorruptCheckpointError(f"{root}: no {MANIFEST}; the checkpoint was never completed")
    expected = json.loads(manifest.read_text())["files"]
    actual = _hash_tree(root)
    for name, digest in expected.items():
        if actual.get(name) != digest:
            raise CorruptCheckpointError(f"{root}: {name} is missing or does not match its SHA-256 in {MANIFEST}")


def load_state(root: Path, grm: GRM) -> tuple[dict[str, Any], dict[str, Any], list[dict]]:
    """Restore the adapter in place; return (trainer_state, scheduler_state, history). The engine, built on the
    restored adapter, then loads its optimizer state from the same directory."""
    verify(root)
    grm.tuner.load_pretrained(str(root / "adapter"))
    history = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines() if line]
    return json.loads((root / "trainer_state.json").read_text()), json.loads((root / "s2sched.json").read_text()), history


def load_model(root: str) -> GRM:
    """The trained model of a verified checkpoint (or of a bare adapter directory)."""
    path = Path(root)
    if (path / "adapter").is_dir():
        verify(path)
        path = path / "adapter"
    return GRM.from_pretrained(str(path))

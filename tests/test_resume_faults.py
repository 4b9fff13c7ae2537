"""Resume picks the newest checkpoint that verifies: a corrupt newest one must not block every resume."""

import json
import logging
from pathlib import Path

import pytest
from ray.train import Checkpoint

from recfound.io import sha256
from recfound.train import checkpoint
from recfound.train.checkpoint import CorruptCheckpointError
from recfound.train.engine import ZERO_DIR, verify_partitions


class StubModel:
    """What ``checkpoint.save`` needs of a GRM: an adapter directory with a weights file."""

    def save_pretrained(self, path: str) -> None:
        Path(path).mkdir(parents=True)
        (Path(path) / "adapter_model.safetensors").write_bytes(bytes(range(256)))


def _save(root: Path, step: int) -> Path:
    root.mkdir(parents=True)
    checkpoint.save(root, StubModel(), {"step": step, "world_size": 1}, {"step": step}, [{"step": step}])
    return root


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


def _run(tmp_path: Path, steps: int) -> list[Path]:
    """A Ray Train run directory whose checkpoints are named in creation order, oldest first."""
    return [_save(tmp_path / f"checkpoint_{i:06d}", (i + 1) * 4) for i in range(steps)]


def _chosen(latest: Path) -> Path:
    return Path(checkpoint.resumable(Checkpoint(str(latest)), checkpoint.verify).path)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_newest_that_verifies(tmp_path: Path, caplog) -> None:
    older, newest = _run(tmp_path, 2)
    _flip(newest / "adapter" / "adapter_model.safetensors")
    with caplog.at_level(logging.WARNING, logger="recfound.train.checkpoint"):
        assert _chosen(newest) == older
    assert str(newest) in caplog.text and "adapter/adapter_model.safetensors" in caplog.text


def test_a_sound_newest_checkpoint_is_chosen_without_a_warning(tmp_path: Path, caplog) -> None:
    _, newest = _run(tmp_path, 2)
    with caplog.at_level(logging.WARNING, logger="recfound.train.checkpoint"):
        assert _chosen(newest) == newest
    assert not caplog.records


def test_half_written_and_newer_than_registered_checkpoints_are_never_chosen(tmp_path: Path) -> None:
    oldest, torn, registered = _run(tmp_path, 3)
    (torn / checkpoint.MANIFEST).unlink()  # an upload that never completed
    _flip(registered / "trainer_state.json")
    _save(tmp_path / "checkpoint_000003", 16)  # in storage, but Ray Train never registered it
    assert _chosen(registered) == oldest


def test_when_none_verifies_the_error_names_them_all(tmp_path: Path) -> None:
    older, newest = _run(tmp_path, 2)
    _flip(older / "s2sched.json")
    (newest / "metrics.jsonl").unlink()
    with pytest.raises(CorruptCheckpointError) as err:
        _chosen(newest)
    assert str(older) in str(err.value) and str(newest) in str(err.value)
    assert "s2sched.json" in str(err.value) and "metrics.jsonl" in str(err.value)


def test_every_rank_checks_every_zero_partition(tmp_path: Path) -> None:
    """Ranks choose the checkpoint independently: each must reject one whose any partition is torn."""
    root = tmp_path / "ckpt"
    (root / ZERO_DIR).mkdir(parents=True)
    (root / "trainer_state.json").write_text(json.dumps({"world_size": 2}))
    for rank in (0, 1):
        shard = root / ZERO_DIR / f"rank_{rank}_optim_states.pt"
        shard.write_bytes(bytes([rank]) * 32)
        digests = {str(shard.relative_to(root)): sha256(str(shard))}
        (root / ZERO_DIR / f"rank-{rank}.json").write_text(json.dumps(digests))
    verify_partitions(root)
    _flip(root / ZERO_DIR / "rank_1_optim_states.pt")
    with pytest.raises(CorruptCheckpointError, match="rank-1.json"):
        verify_partitions(root)


def test_a_stop_is_recorded_in_the_run_storage_and_cleared_by_a_rerun(tmp_path: Path) -> None:
    """The reason outlives any actor (it used to live in the S2Sched actor's memory, lost on a restart)."""
    from recfound.train.halt import clear_halt, halt_url, read_halt, record_halt

    url = halt_url(str(tmp_path / "runs"), "run-nan")
    assert read_halt(url) is None
    record_halt(url, 3, "step 3: loss of task u2i is nan")  # before the first checkpoint: no run folder yet
    assert read_halt(url) == "step 3: loss of task u2i is nan"
    clear_halt(url)
    assert read_halt(url) is None

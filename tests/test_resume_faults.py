"""Resume picks the newest checkpoint that verifies: a corrupt newest one must not block every resume."""

import builtins
import errno
import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest
from ray.train import Checkpoint

from recfound.artifacts import CHECKPOINT_MANIFEST
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
    (torn / CHECKPOINT_MANIFEST).unlink()  # an upload that never completed
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


class _FullDisk:
    """``open`` whose ``k``-th file opened for writing gets half its first write, then ENOSPC (a disk filling)."""

    def __init__(self, real_open: Callable[..., IO[Any]], k: int):
        self.real_open, self.k, self.opened = real_open, k, 0

    def __call__(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> IO[Any]:
        handle = self.real_open(file, mode, *args, **kwargs)
        if not set(mode) & set("wax"):
            return handle
        self.opened += 1
        return _Torn(handle) if self.opened == self.k else handle


class _Torn:
    def __init__(self, handle: IO[Any]):
        self._handle = handle

    def write(self, data: Any) -> int:
        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> "_Torn":
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()


@pytest.mark.parametrize("k", range(1, 6), ids=["adapter", "trainer_state", "s2sched", "metrics", "manifest"])
def test_a_full_disk_mid_checkpoint_names_the_file_and_the_last_good_one_resumes(
    tmp_path: Path, monkeypatch, k: int
) -> None:
    """The k-th of the five files a checkpoint writes hits ENOSPC half written: the error names that file and the
    cause, and the torn checkpoint (left where it was written) is never chosen over the last complete one."""
    older = _save(tmp_path / "checkpoint_000000", 4)
    torn = tmp_path / "checkpoint_000001"
    torn.mkdir()
    full = _FullDisk(builtins.open, k)
    monkeypatch.setattr(builtins, "open", full)
    monkeypatch.setattr(io, "open", full)
    with pytest.raises(checkpoint.CheckpointWriteError) as err:
        checkpoint.save(torn, StubModel(), {"step": 8, "world_size": 1}, {"step": 8}, [{"step": 8}])
    monkeypatch.undo()
    assert full.opened == k and str(torn) in str(err.value) and "No space left on device" in str(err.value)
    assert _chosen(torn) == older

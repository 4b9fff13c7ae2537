"""The one way artifact manifests are made and checked (recfound.artifacts), for every kind of artifact."""

from __future__ import annotations

from pathlib import Path

import pytest

from recfound.artifacts import hash_tree, verify_tree


class Torn(Exception):
    """Stands for a caller's own error type (CorruptCheckpointError, ChecksumError, ExportError)."""


def _tree(root: Path) -> dict[str, str]:
    (root / "adapter").mkdir(parents=True)
    (root / "adapter" / "weights.bin").write_bytes(b"\x00\x01")
    (root / "state.json").write_text("{}")
    (root / "manifest.json").write_text("{}")
    return hash_tree(root, skip={"manifest.json"})


def test_hash_tree_lists_every_file_by_posix_path_except_skipped(tmp_path: Path) -> None:
    files = _tree(tmp_path)
    assert sorted(files) == ["adapter/weights.bin", "state.json"]
    assert files["state.json"] == "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"  # sha256 of {}


def test_verify_tree_names_the_file_and_the_manifest_in_the_callers_error(tmp_path: Path) -> None:
    files = _tree(tmp_path)
    verify_tree(tmp_path, files, listed_in="manifest.json", error=Torn)
    (tmp_path / "state.json").write_text('{"x": 1}')
    with pytest.raises(Torn, match=r": state.json does not match its SHA-256 in manifest.json$"):
        verify_tree(tmp_path, files, listed_in="manifest.json", error=Torn)
    (tmp_path / "state.json").unlink()
    with pytest.raises(Torn, match=r": state.json is listed in manifest.json but missing$"):
        verify_tree(tmp_path, files, listed_in="manifest.json", error=Torn)


def test_verify_tree_refuses_unlisted_files_only_when_asked(tmp_path: Path) -> None:
    files = _tree(tmp_path)
    (tmp_path / "stray.py").write_text("import os")
    verify_tree(tmp_path, files, listed_in="manifest.json", error=Torn)
    with pytest.raises(Torn, match=r"files not listed in manifest.json: stray.py$"):
        verify_tree(tmp_path, files, listed_in="manifest.json", error=Torn, unlisted_ok=False, skip={"manifest.json"})


def test_verify_tree_never_reads_outside_the_artifact(tmp_path: Path) -> None:
    """A manifest is input: a listed ``../secret`` is refused before it is opened, even if its digest is right."""
    root = tmp_path / "artifact"
    files = _tree(root)
    (tmp_path / "secret").write_text("{}")
    with pytest.raises(Torn, match=r"listed file '../secret' lies outside the artifact"):
        verify_tree(root, files | {"../secret": files["state.json"]}, listed_in="manifest.json", error=Torn)

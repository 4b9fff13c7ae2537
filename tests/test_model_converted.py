"""The converted-backbone cache: only a machine's first load pays for the GGUF conversion, a reader never sees a
half-written conversion, and a cache that cannot be written falls back to the GGUF file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from recfound.model import converted as converted_module
from recfound.model import pretrained
from recfound.model.backbone import BackboneConfig
from recfound.model.converted import CACHE_ENV, COMPLETE, converted
from recfound.model.pretrained import load_backbone
from recfound.model.tokenizer import SMOLLM2_GGUF, smollm2_dir, with_pad


@pytest.fixture
def source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "weights.gguf"
    gguf.write_bytes(b"GGUF")
    return gguf


def test_the_first_call_converts_and_later_ones_reuse_it(source: Path) -> None:
    calls: list[Path] = []

    def write(out: Path) -> None:
        calls.append(out)
        (out / "model.safetensors").write_text("weights")

    first = converted(source, "model", write)
    assert first is not None and (first / "model.safetensors").read_text() == "weights"
    assert converted(source, "model", write) == first and len(calls) == 1
    assert [p.name for p in first.parent.iterdir()] == ["model"]  # no staging folder left behind
    source.write_bytes(b"GGUF v2")  # another content: another conversion
    assert converted(source, "model", write) != first and len(calls) == 2


def test_a_reinstalled_copy_of_the_same_file_reuses_the_conversion(source: Path) -> None:
    """A fresh virtual environment installs the same GGUF with a new modification time: no second conversion."""
    calls: list[Path] = []
    first = converted(source, "model", lambda out: calls.append(out))
    copy = source.parent / "venv2" / source.name
    copy.parent.mkdir()
    copy.write_bytes(source.read_bytes())
    os.utime(copy, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    assert converted(copy, "model", lambda out: calls.append(out)) == first and len(calls) == 1


def test_a_conversion_that_never_completed_is_replaced_and_a_failed_one_leaves_nothing(source: Path) -> None:
    def fail(out: Path) -> None:
        (out / "part").write_text("half")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError, match="killed"):
        converted(source, "model", fail)
    root = Path(converted_module.cache_root())
    assert not any(root.rglob("part"))
    # A folder in place without its marker (an older crash): ignored and replaced.
    folder = converted(source, "model", lambda out: (out / "ok").write_text("1"))
    assert folder is not None
    (folder / COMPLETE).unlink()
    (folder / "ok").write_text("stale")
    again = converted(source, "model", lambda out: (out / "ok").write_text("2"))
    assert again == folder and (folder / "ok").read_text() == "2" and (folder / COMPLETE).is_file()


def test_a_cache_that_cannot_be_written_falls_back(
    source: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = source.parent / "read-only"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv(CACHE_ENV, str(blocker))
    assert converted(source, "model", lambda out: None) is None
    assert "loading from the GGUF file each time" in caplog.text


@pytest.mark.slow
def test_the_cached_smollm2_is_the_gguf_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same weights and tokenizer as the GGUF load (the first load converts, the second reads the cache)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    cfg = BackboneConfig(name="smollm2-135m", dtype="float32")  # auto is bf16 on a CPU with native bf16
    cached, tokenizer = load_backbone(cfg)  # converts
    assert any((tmp_path / "cache").rglob(COMPLETE))
    reused, reused_tokenizer = load_backbone(cfg)
    direct = pretrained._smollm2_from_gguf(cfg.attn_implementation, torch.float32)
    texts = ["Red running shoes, size 42", "Ünïcödé\n\n<|im_end|> spaces"]
    ids = torch.as_tensor(tokenizer(texts[0])["input_ids"])[None]
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, direct(ids).logits) and torch.equal(
            reused(ids).logits, direct(ids).logits
        )
    gguf_tokenizer = with_pad(AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF))
    for other in (reused_tokenizer, gguf_tokenizer):
        assert tokenizer(texts)["input_ids"] == other(texts)["input_ids"]
        assert tokenizer.chat_template == other.chat_template and tokenizer.pad_token == other.pad_token

"""Compact deployment (jobs/export.py): an exported task model behaves as the GRM does for that task, and says no
clearly to what it cannot export. Everything runs on the tiny random-init model, without Ray."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from transformers import AutoModel, AutoModelForCausalLM

from recfound.merge.artifact import MergeConfig, merge_checkpoints
from recfound.merge.export import ExportConfig, export
from recfound.merge.exported import (
    INT8_FILE,
    ExportedEmbedder,
    ExportedGenerator,
    ExportError,
    load_export,
    verify_export,
)
from recfound.model.backbone import BackboneConfig, EmbeddingAttention
from recfound.model.formats import Side, encode_embedding
from recfound.model.grm import GRM
from recfound.model.tmole import TMoLEConfig
from recfound.train import checkpoint

REPO = Path(__file__).resolve().parents[1]
BACKBONE = BackboneConfig(name="tiny", max_query_len=64, max_passage_len=48, max_generative_len=64)
TASKS = ["u2i", "q2i", "sentiment_analysis"]  # i2i is left out: a task this model was not trained on
WORDS = "red blue steel cotton kitchen pan shirt phone case charger novel board game lamp desk".split()
TEXTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + (i * 5) % 23)) for i in range(24)]
QPROJ = "model.layers.0.self_attn.q_proj"
PROMPTS = ["How does this reviewer feel: the pan is great", "Sentiment of: it broke after a day"]


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_merged(tmp_path_factory.mktemp("export"))


def make_merged(root: Path, backbone: BackboneConfig = BACKBONE, tasks: list[str] = TASKS) -> Path:
    """A merged artifact of one checkpoint whose adapter moved away from its init (experts, routers and task rows
    all matter, so folding and adapting do)."""
    torch.manual_seed(7)
    grm = GRM.build(backbone, TMoLEConfig(num_experts=3, r=4, alpha=8, task_dim=16, tasks=tasks))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in grm.tuner.trainable_state_dict().values():
            tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    (root / "ckpt").mkdir()
    checkpoint.save(root / "ckpt", grm, {"step": 1, "seed": 7}, {"weights_history": []}, [])
    return merge_checkpoints(MergeConfig(checkpoints=[str(root / "ckpt")], method="linear", out=str(root / "merged")))


@pytest.fixture(scope="module")
def grm(merged: Path) -> GRM:
    return GRM.from_pretrained(str(merged / "adapter")).eval()


def _need_onnx() -> None:
    """format=onnx needs the optional `export` extra, which `make test` does not install."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")


def _grm_vectors(grm: GRM, task: str, side: Side, instruction: str = "Find the item") -> np.ndarray:
    budget = BACKBONE.max_query_len if side is Side.QUERY else BACKBONE.max_passage_len
    batch = encode_embedding(grm.tokenizer, [instruction] * len(TEXTS), TEXTS, budget, keep_end=side.keeps_end(task))
    with torch.no_grad():
        return grm.embed(batch, grm.task_ids([task] * len(TEXTS))).numpy()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("fmt", ["safetensors", "onnx"])
@pytest.mark.parametrize(("task", "side"), [("q2i", Side.QUERY), ("u2i", Side.ITEM)])
def test_fp32_embedding_export_gives_the_grm_vectors(merged, grm, tmp_path, one_thread, fmt, task, side) -> None:
    if fmt == "onnx":
        _need_onnx()
    out = export(ExportConfig(model=str(merged), task=task, out=str(tmp_path / "e"), format=fmt))
    exported = load_export(out)
    assert isinstance(exported, ExportedEmbedder)
    vectors = exported.embed(TEXTS, "Find the item", side)
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 64)
    assert _cosines(vectors, _grm_vectors(grm, task, side)).min() >= 0.9999


@pytest.mark.parametrize("fmt", ["safetensors", "onnx"])
def test_a_causal_embedding_model_exports_with_its_causal_read_out(tmp_path, one_thread, fmt) -> None:
    """A model trained with embedding_attention=causal exports (and reloads) with the causal mask: its vectors are
    the GRM's, not those of the bidirectional read-out, and the manifest says which."""
    if fmt == "onnx":
        _need_onnx()
    causal = BACKBONE.model_copy(update={"embedding_attention": EmbeddingAttention.CAUSAL})
    merged = make_merged(tmp_path, causal)
    grm = GRM.from_pretrained(str(merged / "adapter")).eval()
    assert grm.backbone.embedding_attention.value == "causal"
    out = export(ExportConfig(model=str(merged), task="q2i", out=str(tmp_path / "e"), format=fmt))
    assert json.loads((out / "manifest.json").read_text())["embedding"]["attention"] == "causal"
    vectors = load_export(out).embed(TEXTS, "Find the item", Side.QUERY)
    assert _cosines(vectors, _grm_vectors(grm, "q2i", Side.QUERY)).min() >= 0.9999


def test_fp32_embedding_export_is_a_plain_transformers_decoder(merged, grm, tmp_path, one_thread) -> None:
    out = export(ExportConfig(model=str(merged), task="q2i", out=str(tmp_path / "e")))
    decoder = AutoModel.from_pretrained(str(out))
    assert type(decoder).__name__ == "LlamaModel"  # no LM head, no TMoLE module
    assert not any("tmole" in name for name, _ in decoder.named_modules())


@pytest.mark.parametrize("fmt", ["safetensors", "onnx"])
def test_int8_embedding_export_is_smaller_and_close_to_fp32(merged, grm, tmp_path, one_thread, fmt) -> None:
    """Tiny random model, down_proj kept float (the default): over 200 texts torch int8 measured cosine min 0.995 /
    mean 0.998 to the fp32 vectors, onnxruntime int8 min 0.998."""
    if fmt == "onnx":
        _need_onnx()
    fp32 = export(ExportConfig(model=str(merged), task="q2i", out=str(tmp_path / "fp32"), format=fmt))
    int8 = export(ExportConfig(model=str(merged), task="q2i", out=str(tmp_path / "int8"), format=fmt, quantize="int8"))
    model_file = "model.onnx" if fmt == "onnx" else "model.safetensors"
    int8_file = "model.onnx" if fmt == "onnx" else INT8_FILE
    assert (int8 / int8_file).stat().st_size < (fp32 / model_file).stat().st_size
    cosines = _cosines(load_export(int8).embed(TEXTS, "Find the item"), _grm_vectors(grm, "q2i", Side.QUERY))
    assert cosines.min() >= 0.99
    manifest = json.loads((int8 / "manifest.json").read_text())
    assert manifest["quantization"] == "int8" and manifest["keep_float"] == ["down_proj"]
    if fmt == "onnx":
        import onnx

        quantized = [n.name for n in onnx.load(str(int8 / "model.onnx")).graph.node if n.op_type == "MatMulInteger"]
        assert any("/q_proj/" in name for name in quantized) and not any("/down_proj/" in name for name in quantized)


def test_keep_float_picks_the_float_linears(merged, tmp_path, one_thread) -> None:
    every = load_export(
        export(ExportConfig(model=str(merged), task="q2i", out=str(tmp_path / "all"), quantize="int8", keep_float=""))
    )
    assert isinstance(every.model.get_submodule("layers.1.mlp.down_proj"), DynamicLinear)
    with pytest.raises(ExportError, match="keep_float: down_prj names no linear of the model"):
        export(
            ExportConfig(
                model=str(merged), task="q2i", out=str(tmp_path / "typo"), quantize="int8", keep_float="down_prj"
            )
        )


def test_int8_linears_round_trip_exactly(merged, tmp_path, one_thread) -> None:
    """The stored int8 weights are the ones torch's quantizer produced: loading must not re-round them."""
    from recfound.merge.export import _quantize_linears

    out = export(ExportConfig(model=str(merged), task="q2i", out=str(tmp_path / "int8"), quantize="int8"))
    loaded = load_export(out)
    plain = load_export(export(ExportConfig(model=str(merged), task="q2i", out=str(tmp_path / "fp32"))))
    names = ("layers.0.self_attn.q_proj", "layers.1.mlp.up_proj")
    expected = _quantize_linears(plain.model, names)  # the exported fp32 decoder, quantized here
    got = loaded.model
    assert type(got.get_submodule("layers.1.mlp.down_proj")) is nn.Linear  # keep_float's default
    torch.testing.assert_close(
        got.get_submodule("layers.1.mlp.down_proj").weight,
        plain.model.get_submodule("layers.1.mlp.down_proj").weight,
        rtol=0,
        atol=0,
    )
    for name in names:
        assert isinstance(got.get_submodule(name), DynamicLinear)
        torch.testing.assert_close(
            got.get_submodule(name).weight().int_repr(),
            expected.get_submodule(name).weight().int_repr(),
            rtol=0,
            atol=0,
        )


def test_generative_export_decodes_like_the_grm(merged, grm, tmp_path, one_thread) -> None:
    out = export(ExportConfig(model=str(merged), task="sentiment_analysis", out=str(tmp_path / "g")))
    exported = load_export(out)
    assert isinstance(exported, ExportedGenerator)
    expected = grm.generate(PROMPTS, "sentiment_analysis", max_new_tokens=8)
    assert any(expected) and exported.generate(PROMPTS, max_new_tokens=8) == expected
    plain = AutoModelForCausalLM.from_pretrained(str(out))  # self-contained: plain transformers loads it
    assert not any("tmole" in name for name, _ in plain.named_modules())
    int8 = load_export(
        export(ExportConfig(model=str(merged), task="sentiment_analysis", out=str(tmp_path / "g8"), quantize="int8"))
    )
    texts = int8.generate(PROMPTS, max_new_tokens=4)
    assert len(texts) == len(PROMPTS) and all(isinstance(text, str) for text in texts)
    assert isinstance(int8.model.lm_head, DynamicLinear) and isinstance(int8.model.get_submodule(QPROJ), DynamicLinear)


def test_manifest_records_the_export_and_its_checksums_verify(merged, tmp_path, one_thread) -> None:
    out = export(ExportConfig(model=str(merged), task="q2i", out=str(tmp_path / "e"), quantize="int8"))
    manifest = verify_export(out)
    assert {k: manifest[k] for k in ("task", "mode", "quantization", "format")} == {
        "task": "q2i",
        "mode": "embedding",
        "quantization": "int8",
        "format": "safetensors",
    }
    assert manifest["source"]["model"] == str(merged.resolve())
    assert manifest["embedding"]["dim"] == 64 and manifest["budgets"]["item"] == BACKBONE.max_passage_len
    assert {INT8_FILE, "config.json", "tokenizer.json"} <= set(manifest["files"])
    blob = bytearray((out / INT8_FILE).read_bytes())
    blob[-1] ^= 0xFF
    (out / INT8_FILE).write_bytes(bytes(blob))
    with pytest.raises(ExportError, match=f"{INT8_FILE} does not match its SHA-256"):
        load_export(out)
    (out / INT8_FILE).unlink()
    with pytest.raises(ExportError, match="listed in manifest.json but missing"):
        verify_export(out)


def test_unlisted_file_is_refused(merged, tmp_path, one_thread) -> None:
    out = export(ExportConfig(model=str(merged), task="q2i", out=str(tmp_path / "e"), quantize="int8"))
    (out / "model.safetensors").write_bytes(b"stray")  # plain transformers would load this instead
    with pytest.raises(ExportError, match="not listed in manifest.json: model.safetensors"):
        verify_export(out)


def test_bad_input_is_refused_clearly(merged, tmp_path) -> None:
    with pytest.raises(ValidationError, match="unknown task 'q2x'"):
        ExportConfig(model=str(merged), task="q2x", out=str(tmp_path / "e"))
    with pytest.raises(ValidationError, match="format=onnx exports embedding tasks"):
        ExportConfig(model=str(merged), task="sentiment_analysis", out=str(tmp_path / "e"), format="onnx")
    with pytest.raises(ValidationError, match="no such file"):
        ExportConfig(model=str(tmp_path / "missing"), task="q2i", out=str(tmp_path / "e"))
    with pytest.raises(ExportError, match="i2i: the model was not trained on it; its tasks are u2i, q2i"):
        export(ExportConfig(model=str(merged), task="i2i", out=str(tmp_path / "e")))
    with pytest.raises(ExportError, match="a training checkpoint: merge it first"):
        export(ExportConfig(model=str(merged.parent / "ckpt"), task="q2i", out=str(tmp_path / "e")))
    with pytest.raises(ExportError, match="must lie outside model="):
        export(ExportConfig(model=str(merged), task="q2i", out=str(merged / "export")))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an earlier output of this job .*; refusing to overwrite"):
        export(ExportConfig(model=str(merged), task="q2i", out=str(tmp_path / "busy")))
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".e.tmp-*")) and not list(tmp_path.glob(".busy.tmp-*"))


def test_an_export_is_not_a_source_and_a_torn_merge_is_refused(merged, tmp_path, one_thread) -> None:
    out = export(ExportConfig(model=str(merged), task="q2i", out=str(tmp_path / "e"), quantize="int8"))
    with pytest.raises(ExportError, match="is an export .*not a merged artifact"):
        export(ExportConfig(model=str(out), task="q2i", out=str(tmp_path / "again")))
    export(ExportConfig(model=str(merged), task="u2i", out=str(out)))  # an earlier export is replaced
    assert verify_export(out)["task"] == "u2i" and not (out / INT8_FILE).exists()
    torn = tmp_path / "torn"
    subprocess.run(["cp", "-r", str(merged), str(torn)], check=True)
    (torn / "adapter" / "adapter_model.safetensors").write_bytes(b"torn")
    with pytest.raises(ExportError, match="adapter/adapter_model.safetensors does not match its SHA-256"):
        export(ExportConfig(model=str(torn), task="q2i", out=str(tmp_path / "e2")))


def test_cli_help_export_and_error(merged, tmp_path) -> None:
    job = [sys.executable, str(REPO / "jobs" / "export.py")]
    shown = subprocess.run([*job, "--help"], capture_output=True, text=True, check=True).stdout
    for key in ("model", "task", "out", "quantize", "format"):
        assert f"  {key} (" in shown
    assert "none|int8" in shown and "safetensors|onnx" in shown
    done = subprocess.run(
        [*job, f"model={merged}", "task=q2i", f"out={tmp_path / 'e'}", "quantize=int8"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip().splitlines()[-1] == str(tmp_path / "e")
    failed = subprocess.run(
        [*job, f"model={merged}", "task=i2i", f"out={tmp_path / 'f'}"], capture_output=True, text=True, check=False
    )
    assert failed.returncode == 1 and "error: task=i2i: the model was not trained on it" in failed.stderr


def test_int8_file_stores_a_tied_weight_once(tmp_path) -> None:
    """SmolLM2 ties lm_head to the embedding table; kept float, the pair is one tensor on disk and tied on load."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from recfound.merge.export import _int8_tensors
    from recfound.merge.exported import _load_int8

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    tensors = _int8_tensors(model, ["lm_head", "down_proj"])
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
    save_file(tensors, str(tmp_path / INT8_FILE))
    loaded = _load_int8(LlamaForCausalLM(config), tmp_path / INT8_FILE)
    torch.testing.assert_close(loaded.lm_head.weight, model.model.embed_tokens.weight, rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, DynamicLinear)

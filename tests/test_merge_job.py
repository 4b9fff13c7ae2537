"""Model Merge over real TMoLE checkpoints: the artifact, its manifest, and that it loads and behaves."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from recfound.merge.artifact import MergeConfig, merge_checkpoints
from recfound.merge.methods import MergeMethod
from recfound.model.backbone import BackboneConfig
from recfound.model.grm import GRM
from recfound.model.tmole import TMoLEConfig
from recfound.train import checkpoint
from recfound.train.checkpoint import CorruptCheckpointError

REPO = Path(__file__).resolve().parents[1]
BACKBONE = BackboneConfig(name="tiny", max_query_len=64, max_passage_len=64, max_generative_len=64)
SEED = 7


def _fresh() -> GRM:
    torch.manual_seed(SEED)  # what the trainer does before building, so merge can rebuild θ0
    return GRM.build(BACKBONE, TMoLEConfig(num_experts=3, r=4, alpha=8, task_dim=16, backbone=BACKBONE.model_dump()))


def _checkpoint(root: Path, shift: float, seed: int = SEED) -> GRM:
    grm = _fresh()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(int(shift * 1000))
        for tensor in grm.tuner.trainable_state_dict().values():
            tensor.add_(shift * torch.randn(tensor.shape, generator=generator))
    root.mkdir(parents=True)
    checkpoint.save(root, grm, {"step": 1, "seed": seed}, {"weights_history": []}, [])
    return grm


def _ids() -> dict:
    return {"input_ids": torch.tensor([[5, 9, 12, 40, 41]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}


def test_linear_of_one_checkpoint_reproduces_it(tmp_path: Path) -> None:
    source = _checkpoint(tmp_path / "c1", 0.1)
    out = merge_checkpoints(
        MergeConfig(checkpoints=[str(tmp_path / "c1")], method=MergeMethod.LINEAR, out=str(tmp_path / "m"))
    )
    merged = GRM.from_pretrained(str(out / "adapter"))
    for key, value in source.tuner.trainable_state_dict().items():
        torch.testing.assert_close(merged.tuner.trainable_state_dict()[key], value, rtol=0, atol=0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "linear" and manifest["sources"] == [str((tmp_path / "c1").resolve())]
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= set(manifest["files"])


def test_ties_with_full_density_of_one_checkpoint_is_that_checkpoint(tmp_path: Path) -> None:
    """θ0 rebuilt from the recorded seed must be the trainer's θ0, else θ0 + τ would not give θ back."""
    source = _checkpoint(tmp_path / "c1", 0.2)
    out = merge_checkpoints(
        MergeConfig(checkpoints=[str(tmp_path / "c1")], method="ties", density=1.0, out=str(tmp_path / "m"))
    )
    merged = GRM.from_pretrained(str(out / "adapter"))
    for key, value in source.tuner.trainable_state_dict().items():
        torch.testing.assert_close(merged.tuner.trainable_state_dict()[key], value, rtol=1e-6, atol=1e-6)


def test_ties_of_two_runs_lands_between_and_exports_plain_task_models(tmp_path: Path) -> None:
    a = _checkpoint(tmp_path / "a", 0.1)
    _checkpoint(tmp_path / "b", 0.3)
    cfg = MergeConfig(
        checkpoints=f"{tmp_path / 'a'},{tmp_path / 'b'}", out=str(tmp_path / "m"), export_tasks="u2i,sentiment_analysis"
    )
    out = merge_checkpoints(cfg)
    merged = GRM.from_pretrained(str(out / "adapter"))
    assert merged.tuner.trainable_state_dict().keys() == a.tuner.trainable_state_dict().keys()
    plain = AutoModelForCausalLM.from_pretrained(str(out / "tasks" / "sentiment_analysis"))
    merged.eval()
    with torch.no_grad():
        routed = merged.tuner(**_ids(), task_ids=merged.task_ids(["sentiment_analysis"])).logits
        folded = plain(**_ids()).logits
    torch.testing.assert_close(folded, routed, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, type(merged.tuner)) for m in plain.modules())


def test_refuses_torn_or_foreign_checkpoints(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "a", 0.1)
    (tmp_path / "a" / "checkpoint.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="never completed"):
        merge_checkpoints(MergeConfig(checkpoints=[str(tmp_path / "a")], out=str(tmp_path / "m")))
    _checkpoint(tmp_path / "b", 0.1)
    (tmp_path / "b" / "adapter" / "adapter_model.safetensors").write_bytes(b"torn")
    with pytest.raises(CorruptCheckpointError, match="adapter_model.safetensors"):
        merge_checkpoints(MergeConfig(checkpoints=[str(tmp_path / "b")], out=str(tmp_path / "m")))
    with pytest.raises(ValueError, match="slerp merges exactly two"):
        MergeConfig(checkpoints=[str(tmp_path / "a")], method="slerp")


def test_cli_help_and_merge(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "a", 0.1)
    _checkpoint(tmp_path / "b", 0.2)
    job = [sys.executable, str(REPO / "jobs" / "merge.py")]
    shown = subprocess.run([*job, "--help"], capture_output=True, text=True, check=True).stdout
    for key in ("checkpoints", "method", "out", "density", "t", "weights", "export_tasks"):
        assert f"  {key} (" in shown
    done = subprocess.run(
        [*job, f"checkpoints={tmp_path / 'a'},{tmp_path / 'b'}", "method=slerp", f"out={tmp_path / 'm'}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip().splitlines()[-1] == str(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["parameters"]["t"] == 0.6

"""jobs/adapt.py: a new task or domain on ~1 % of the adapter's parameters (task-table rows, soft prompts), on the tiny
random-init model without Ray: only those parameters move, the loss falls, and the artifact is served like a merge."""

import json
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from test_export import make_merged

from recfound.artifacts import MANIFEST
from recfound.model.backbone import BackboneConfig
from recfound.model.formats import Side
from recfound.model.grm import GRM
from recfound.model.tmole import read_adapter_config, read_adapter_weights
from recfound.model.tmole.model import TASK_TABLE_KEY
from recfound.serving.engine import ENGINE_KEY, load_engine
from recfound.serving.index import build_item_index, text_meta
from recfound.serving.publish import publish
from recfound.serving.registry import resolve_verified
from recfound.tasks import ITEMS
from recfound.train.adapt import AdaptConfig, AdaptError, adapt, trainable_model

REPO = Path(__file__).resolve().parents[1]
# Budgets that fit the synthetic rows' instructions (byte-level tokenizer).
BACKBONE = BackboneConfig(name="tiny", max_query_len=192, max_passage_len=192, max_generative_len=256)
TASKS = ["u2i", "q2i", "i2i", "sentiment_analysis"]  # item_profile is new to this model
TASK_DIM = 16
STEPS = 12
PROMPTS = ["Describe the item: red running shoes", "Describe the item: ceramic coffee mug"]


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_merged(tmp_path_factory.mktemp("adapt"), BACKBONE, TASKS)


def _config(merged: Path, data: Path, out: Path, **overrides) -> AdaptConfig:
    return AdaptConfig(
        **{"model": str(merged), "data": str(data), "out": str(out), "steps": STEPS, "valid_rows": 32} | overrides
    )


@pytest.fixture(scope="module")
def adapted(merged: Path, synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new task (item_profile) and an existing one on this data (i2i), task-embedding rows only."""
    out = tmp_path_factory.mktemp("adapted") / "out"
    return adapt(_config(merged, synthetic_dataset, out, tasks="item_profile,i2i"))


@pytest.fixture(scope="module")
def prompted(merged: Path, synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prompted") / "out"
    return adapt(_config(merged, synthetic_dataset, out, tasks="item_profile", method="prompt", prompt_tokens=2))


@pytest.fixture(scope="module")
def experted(merged: Path, synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("experted") / "out"
    return adapt(_config(merged, synthetic_dataset, out, tasks="item_profile", method="expert"))


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def test_only_the_adapted_rows_change(merged: Path, adapted: Path) -> None:
    source, result = read_adapter_weights(str(merged / "adapter")), read_adapter_weights(str(adapted / "adapter"))
    assert result.keys() == source.keys()
    for key in source.keys() - {TASK_TABLE_KEY}:  # every expert and router, byte for byte
        assert _same_bytes(result[key], source[key]), key
    tasks = read_adapter_config(str(adapted / "adapter")).tasks
    assert tasks == [*TASKS, "item_profile"]  # a new task is appended: existing task ids keep their rows
    old, new = source[TASK_TABLE_KEY], result[TASK_TABLE_KEY]
    for task in ("u2i", "q2i", "sentiment_analysis"):
        assert _same_bytes(new[tasks.index(task)], old[TASKS.index(task)]), task
    assert not torch.equal(new[tasks.index("i2i")], old[TASKS.index("i2i")])
    # item_profile started at the mean of the generative rows (sentiment_analysis alone here) and moved from it.
    assert not torch.equal(new[tasks.index("item_profile")], old[TASKS.index("sentiment_analysis")])
    assert (
        read_adapter_config(str(adapted / "adapter")).backbone == read_adapter_config(str(merged / "adapter")).backbone
    )


def test_the_optimizer_gets_only_task_rows_and_prompts(merged: Path, synthetic_dataset: Path, tmp_path: Path) -> None:
    """Everything else, backbone included, is frozen in the model that trains."""
    cfg = _config(merged, synthetic_dataset, tmp_path / "o", tasks="item_profile", method="prompt", prompt_tokens=2)
    model = trainable_model(
        read_adapter_config(str(merged / "adapter")), read_adapter_weights(str(merged / "adapter")), cfg
    )
    trained = {name for name, p in model.grm.named_parameters() if p.requires_grad}
    assert trained == {"tuner.tmole_task_table.default.weight", "tuner.tmole_soft_prompt.default.item_profile"}
    assert {id(p) for p in model.params} == {id(p) for p in model.grm.parameters() if p.requires_grad}
    assert model.count == TASK_DIM + 2 * model.grm.tuner.model.config.hidden_size


def test_an_expert_adaptation_adds_a_private_expert_and_moves_nothing_shared(merged: Path, experted: Path) -> None:
    source, result = read_adapter_weights(str(merged / "adapter")), read_adapter_weights(str(experted / "adapter"))
    config = read_adapter_config(str(experted / "adapter"))
    assert config.task_experts == {"item_profile": 1} and config.tasks == [*TASKS, "item_profile"]
    private = result.keys() - source.keys()
    assert private and all(k.endswith(("tmole_task_A.item_profile", "tmole_task_B.item_profile")) for k in private)
    assert all(result[k].abs().sum() > 0 for k in private if "tmole_task_B" in k)  # B starts at 0 and trained
    for key in source.keys() - {TASK_TABLE_KEY}:
        assert _same_bytes(result[key], source[key]), key
    assert _same_bytes(result[TASK_TABLE_KEY][: len(TASKS)], source[TASK_TABLE_KEY])
    manifest = _manifest(experted)
    assert manifest["trained_parameters"] == TASK_DIM + sum(result[k].numel() for k in private)
    assert manifest["changed_tasks"] == ["item_profile"] and manifest["parameters"]["lr"] == 1e-3
    assert manifest["valid_loss"]["item_profile"]["after"] < manifest["valid_loss"]["item_profile"]["before"]


def test_an_expert_adapted_task_folds_and_serves_and_the_others_serve_as_before(
    merged, experted, synthetic_dataset, tmp_path, one_thread
) -> None:
    source, served = (_serve(m, synthetic_dataset, tmp_path / name) for m, name in ((merged, "r0"), (experted, "r1")))
    direct = GRM.from_pretrained(str(experted / "adapter")).eval()
    with torch.no_grad():
        expected = direct.generate(PROMPTS, "item_profile", max_new_tokens=6)
        plain = direct.merge_task("item_profile")  # the private expert folds into W0 like the shared ones
        batch = direct.tokenizer(PROMPTS[:1], return_tensors="pt")
        routed = direct.tuner(**batch, task_ids=direct.task_ids(["item_profile"])).logits
        torch.testing.assert_close(plain(**batch).logits, routed, atol=1e-5, rtol=1e-5)
    assert served.generate("item_profile", PROMPTS, max_tokens=6, temperature=0.0) == expected
    assert served.generate("sentiment_analysis", PROMPTS, 6, 0.0) == source.generate(
        "sentiment_analysis", PROMPTS, 6, 0.0
    )


def test_full_adaptation_is_the_reference_that_moves_every_expert(
    merged: Path, synthetic_dataset: Path, tmp_path: Path
) -> None:
    full = adapt(_config(merged, synthetic_dataset, tmp_path / "full", tasks="item_profile", method="full", steps=3))
    source, result = read_adapter_weights(str(merged / "adapter")), read_adapter_weights(str(full / "adapter"))
    assert result.keys() == source.keys()
    moved = {k for k in source if k != TASK_TABLE_KEY and not _same_bytes(result[k], source[k])}
    assert moved == {
        k for k in source if k.endswith(("tmole_A", "tmole_B", "tmole_router.weight", "tmole_router.bias"))
    }
    manifest = _manifest(full)
    assert manifest["changed_tasks"] == [*TASKS, "item_profile"] and manifest["parameters"]["lr"] == 5e-4
    experts = sum(t.numel() for k, t in source.items() if k != TASK_TABLE_KEY)
    assert manifest["trained_parameters"] == experts + TASK_DIM  # every expert and router, and the new task's row


def test_trained_share_is_reported_and_small(merged: Path, adapted: Path, prompted: Path) -> None:
    total = sum(t.numel() for t in read_adapter_weights(str(merged / "adapter")).values())
    for path, trained in ((adapted, 2 * TASK_DIM), (prompted, TASK_DIM + 2 * 64)):
        manifest = _manifest(path)
        assert manifest["trained_parameters"] == trained and manifest["adapter_parameters"] == total
        assert manifest["trained_share"] == pytest.approx(trained / total) and manifest["trained_share"] <= 0.02
    assert _manifest(adapted)["method"] == "task_embedding" and _manifest(adapted)["adapted_tasks"] == [
        "item_profile",
        "i2i",
    ]
    assert _manifest(prompted)["method"] == "prompt" and _manifest(prompted)["kind"] == "adapted"


def test_the_adapted_tasks_valid_loss_goes_down(adapted: Path, prompted: Path) -> None:
    for path in (adapted, prompted):
        manifest = _manifest(path)
        assert len(manifest["train_loss"]) == STEPS
        for task, loss in manifest["valid_loss"].items():
            assert loss["after"] < loss["before"], (path.name, task, loss)


def test_same_seed_same_weights(merged: Path, synthetic_dataset: Path, adapted: Path, tmp_path: Path) -> None:
    """Tensor bytes, not file hashes: safetensors writes its header's metadata in a per-process random order."""
    again = adapt(_config(merged, synthetic_dataset, tmp_path / "again", tasks="item_profile,i2i"))
    first, second = read_adapter_weights(str(adapted / "adapter")), read_adapter_weights(str(again / "adapter"))
    assert first.keys() == second.keys() and all(_same_bytes(first[k], second[k]) for k in first)
    assert _manifest(again)["train_loss"] == _manifest(adapted)["train_loss"]


def _serve(model: Path, data: Path, registry: Path):
    """jobs/publish.py's publish (verify, index the catalogue with the engine), then the engine serving loads."""
    meta = {ENGINE_KEY: "recfound.serving.engine:GRMEngine", **text_meta(json.loads((data / MANIFEST).read_text()))}
    publish(str(model), str(registry), partial(build_item_index, items_url=str(data / ITEMS)), meta)
    return load_engine(resolve_verified(str(registry)))


def test_published_artifacts_serve_the_adapted_tasks(
    merged, adapted, prompted, synthetic_dataset, tmp_path, one_thread
) -> None:
    source, plain, prompt = (
        _serve(m, synthetic_dataset, tmp_path / name) for m, name in ((merged, "r0"), (adapted, "r1"), (prompted, "r2"))
    )
    texts = ["red running shoes", "ceramic coffee mug"]
    direct = GRM.from_pretrained(str(adapted / "adapter")).eval()
    with torch.no_grad():
        expected = direct.generate(PROMPTS, "item_profile", max_new_tokens=6)
    assert plain.generate("item_profile", PROMPTS, max_tokens=6, temperature=0.0) == expected
    assert plain.embed("i2i", texts, "Find the item", Side.ITEM).shape == (2, 64)
    # The soft prompt is in the served path (generation and scoring), and untouched tasks serve as before.
    tuned = GRM.from_pretrained(str(prompted / "adapter")).eval()
    assert tuned.tuner.soft_prompt(tuned.task_ids(["item_profile"])) is not None
    assert prompt.generate("item_profile", PROMPTS, max_tokens=6, temperature=0.0) == tuned.generate(
        PROMPTS, "item_profile", max_new_tokens=6
    )
    scores = prompt.choice_scores("item_profile", PROMPTS[:1], ["shoes", "mug"])
    assert torch.allclose(torch.from_numpy(scores), tuned.choice_scores(PROMPTS[:1], ["shoes", "mug"], "item_profile"))
    for served in (plain, prompt):
        assert (
            served.embed("u2i", texts, "Find the item", Side.QUERY)
            == source.embed("u2i", texts, "Find the item", Side.QUERY)
        ).all()
        assert served.generate("sentiment_analysis", PROMPTS, 6, 0.0) == source.generate(
            "sentiment_analysis", PROMPTS, 6, 0.0
        )


def test_a_prompted_task_refuses_to_fold(prompted: Path) -> None:
    with pytest.raises(ValueError, match="soft prompt"):
        GRM.from_pretrained(str(prompted / "adapter")).merge_task("item_profile")


def test_bad_input_is_refused_before_training(merged, synthetic_dataset, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("recfound.train.adapt.train_step", lambda *a, **k: pytest.fail("trained on bad input"))
    with pytest.raises(ValidationError, match="unknown task 'nope'"):
        _config(merged, synthetic_dataset, tmp_path / "o", tasks="i2i,nope")
    with pytest.raises(ValidationError, match="method"):
        _config(merged, synthetic_dataset, tmp_path / "o", tasks="i2i", method="lora")
    with pytest.raises(AdaptError, match="no train split of task answer_generation"):  # the synthetic build skips it
        adapt(_config(merged, synthetic_dataset, tmp_path / "o", tasks="i2i,answer_generation"))
    partial_data = tmp_path / "data"
    shutil.copytree(synthetic_dataset, partial_data)
    (partial_data / "tasks" / "i2i" / "valid.parquet").unlink()
    with pytest.raises(AdaptError, match="no valid split of task i2i"):
        adapt(_config(merged, partial_data, tmp_path / "o", tasks="i2i"))
    with pytest.raises(AdaptError, match="merge it first"):
        adapt(_config(merged.parent / "ckpt", synthetic_dataset, tmp_path / "o", tasks="i2i"))
    with pytest.raises(AdaptError, match="must lie outside"):
        adapt(_config(merged, synthetic_dataset, merged / "inside", tasks="i2i"))
    assert not (tmp_path / "o").exists()


def test_cli_help_errors_and_run(merged: Path, synthetic_dataset: Path, tmp_path: Path) -> None:
    job = [sys.executable, str(REPO / "jobs" / "adapt.py")]
    shown = subprocess.run([*job, "--help"], capture_output=True, text=True, check=True).stdout
    for key in ("model", "data", "tasks", "out", "method", "prompt_tokens", "steps", "rows", "seed", "log_every"):
        assert f"  {key} (" in shown
    assert "task_embedding|prompt|expert|full" in shown
    base = [f"model={merged}", f"data={synthetic_dataset}", f"out={tmp_path / 'o'}"]
    bad = subprocess.run([*job, *base, "tasks=i2i", "method=lora"], check=False, capture_output=True, text=True)
    assert bad.returncode != 0 and "method" in bad.stderr and not (tmp_path / "o").exists()
    bad = subprocess.run([*job, *base, "tasks=answer_generation"], check=False, capture_output=True, text=True)
    assert bad.returncode == 1 and "error: data=" in bad.stderr and "no train split" in bad.stderr
    done = subprocess.run(
        [*job, *base, "tasks=item_profile", "steps=2", "rows=20", "valid_rows=8", "log_every=1"],
        capture_output=True,
        text=True,
        check=True,
    )
    progress = [line for line in done.stderr.splitlines() if line.startswith("adapt step ")]
    assert [line.split()[2] for line in progress] == ["1/2", "2/2"]
    assert all("loss " in line and " tokens/s" in line and "left" in line for line in progress)
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == str(tmp_path / "o") and "adapter parameters" in lines[-2]
    assert _manifest(tmp_path / "o")["train_rows"] == {"item_profile": 20}

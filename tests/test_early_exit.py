"""Early exit: embeddings read after the first k decoder layers (GRM.embed exit_layer=), trained with one InfoNCE
term per exit (loss.exit_layers), evaluated (jobs/evaluate.py exit_layer=) and exported as a k-layer model
(jobs/export.py exit_layer=). Everything on the tiny random-init model (2 decoder layers), without Ray."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from test_eval_job import run_job, tiny_grm
from test_export import make_merged
from test_grad_cache import _rows as embedding_rows
from test_loss_pin import TINY, _sources
from test_train_units import VECTORS, FakeGRM, _emb_rows
from transformers import AutoConfig
from transformers.masking_utils import create_bidirectional_mask

from recfound.config import load_config
from recfound.eval.systems import GRMSystem
from recfound.merge.export import ExportConfig, export
from recfound.merge.exported import ExportedEmbedder, ExportError, load_export
from recfound.model.backbone import SMOLLM2_LAYERS, BackboneConfig, backbone_depth
from recfound.model.formats import Side, encode_embedding
from recfound.model.grm import GRM
from recfound.model.losses import LossConfig, PairKeys, contrastive_loss
from recfound.model.tmole import TMoLEConfig
from recfound.tasks import Mode
from recfound.train.config import TrainConfig
from recfound.train.engine import TorchEngine
from recfound.train.objective import FALSE_NEGATIVES, JointObjective
from recfound.train.step import train_step
from recfound.train.telemetry import StepCost

pytestmark = pytest.mark.usefixtures("one_thread")

INSTRUCTIONS = ["Represent this user query to find a matching item", "", "Embed the product"]
TEXTS = ["red running shoes for trail", "hat", "a blue ceramic coffee mug, 350 ml"]


@pytest.fixture(scope="module")
def grm() -> GRM:
    return tiny_grm()


def _batch(grm: GRM) -> tuple[dict, torch.Tensor]:
    return encode_embedding(grm.tokenizer, INSTRUCTIONS, TEXTS, 128), grm.task_ids(["q2i", "u2i", "i2i"])


# --- the model ---------------------------------------------------------------------------------------------------
def test_exit_at_full_depth_is_exactly_todays_embedding(grm: GRM) -> None:
    batch, tasks = _batch(grm)
    assert grm.num_layers == backbone_depth(BackboneConfig()) == 2
    with torch.no_grad():
        today = grm.embed(batch, tasks)
        states = grm.hidden_states(batch["input_ids"], batch["attention_mask"], tasks, Mode.EMBEDDING)
        (unrolled,) = grm.exit_states(batch["input_ids"], batch["attention_mask"], tasks, [2])
        assert torch.equal(unrolled, states)  # the unrolled decoder loop is the decoder's own, bit for bit
        assert torch.equal(grm.embed_exits(batch, tasks, [2])[0], today)
        assert torch.equal(grm.embed(batch, tasks, exit_layer=2), today)


def test_intermediate_exit_is_the_normed_output_of_the_first_k_layers(grm: GRM) -> None:
    """Against transformers' own per-layer outputs (output_hidden_states: index k is layer k's output, before the
    final norm), under the same bidirectional mask and routing."""
    batch, tasks = _batch(grm)
    decoder = grm.tuner.model.base_model
    attention = torch.as_tensor(batch["attention_mask"])
    embeds = decoder.get_input_embeddings()(torch.as_tensor(batch["input_ids"]))
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    mask = create_bidirectional_mask(
        config=decoder.config, inputs_embeds=embeds, attention_mask=attention, allow_is_bidirectional_skip=False
    )
    with torch.no_grad(), grm.tuner.route(tasks, Mode.EMBEDDING):
        out = decoder(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=False,
            is_causal=False,
            output_hidden_states=True,
        )
        expected = decoder.norm(out.hidden_states[1])
    with torch.no_grad():
        first, last = grm.exit_states(batch["input_ids"], batch["attention_mask"], tasks, [1, 2])
        vectors = grm.embed(batch, tasks, exit_layer=1)
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(last, out.last_hidden_state, rtol=0, atol=0)
    text = torch.as_tensor(batch["text_mask"]).float().unsqueeze(-1)
    pooled = torch.nn.functional.normalize((expected * text).sum(1) / text.sum(1), dim=-1)
    torch.testing.assert_close(vectors, pooled, rtol=0, atol=1e-6)
    assert (vectors - grm.embed(batch, tasks)).abs().max() > 1e-3  # a different read-out, not the last layer's


def test_an_exit_runs_only_the_layers_below_it(grm: GRM) -> None:
    batch, tasks = _batch(grm)
    calls: list[int] = []
    layers = grm.tuner.model.base_model.layers
    hooks = [layer.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            grm.embed(batch, tasks, exit_layer=1)
            assert calls == [0]
            grm.embed_exits(batch, tasks, [1, 2])
            assert calls == [0, 0, 1]  # both exits from one pass
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("layer", [0, 3, -1])
def test_an_exit_the_backbone_does_not_have_is_refused(grm: GRM, layer: int) -> None:
    batch, tasks = _batch(grm)
    with pytest.raises(ValueError, match=rf"exit_layer={layer}: the backbone has 2 decoder layers"):
        grm.embed(batch, tasks, exit_layer=layer)


# --- training ----------------------------------------------------------------------------------------------------
class FakeExitGRM(FakeGRM):
    """test_train_units' fake GRM with 2 layers, whose every exit embeds a row as its last layer does."""

    num_layers = 2

    def check_exits(self, layers: list[int], key: str = "exit_layer") -> None:
        assert all(1 <= k <= 2 for k in layers)

    def embed_exits(self, batch: dict[str, np.ndarray], task_ids: torch.Tensor, layers: list[int]) -> torch.Tensor:
        return torch.stack([self.embed(batch, task_ids) for _ in layers])


def test_each_exit_adds_its_weighted_infonce_and_the_task_stats_stay_the_last_layers() -> None:
    """Hand-checkable: an exit that embeds as the last layer adds exit_weight x the same InfoNCE."""
    cfg = LossConfig(temperature=0.5, contrastive_weight=0.5, exit_layers=[1], exit_weight=0.25)
    loss, stats = JointObjective(FakeExitGRM(), cfg)(_emb_rows(), None)
    # As test_joint_objective_is_weighted_infonce_plus_token_mean_ce: cosines / 0.5 against the four candidates.
    q0 = -2 + math.log(math.exp(2) + 2 * math.exp(1.2) + math.exp(-2))
    q1 = -1.6 + math.log(2 + 2 * math.exp(1.6))
    assert VECTORS[1] == [1.0, 0.0]
    assert loss.item() == pytest.approx(0.5 * (1 + 0.25) * (q0 + q1) / 2, rel=1e-6)
    assert {t: (s.item(), int(n)) for t, (s, n) in stats.items()} == {
        "u2i": (pytest.approx(q0, rel=1e-6), 1),
        "q2i": (pytest.approx(q1, rel=1e-6), 1),
        FALSE_NEGATIVES: (0, 2),
    }


def _plain_grm() -> GRM:
    torch.manual_seed(0)
    return GRM.build(BackboneConfig(), TMoLEConfig(dropout=0.0)).train()


def test_the_exit_term_is_infonce_on_the_exit_layers_embeddings_from_the_same_forward() -> None:
    grm = _plain_grm()
    rows = embedding_rows(grm, rank=0)
    cfg = LossConfig(temperature=0.05, cross_device_negatives=False)
    with_exit = cfg.model_copy(update={"exit_layers": [1], "exit_weight": 0.5})
    base, _ = JointObjective(grm, cfg)(rows, None)
    joint, _ = JointObjective(grm, with_exit)(rows, None)
    ids = grm.task_ids(list(rows["task"]))
    batch, group, width = rows["p_ids"].shape
    names = {"input_ids": "ids", "attention_mask": "mask", "text_mask": "text"}
    queries = grm.embed({key: rows[f"q_{name}"] for key, name in names.items()}, ids, 1)
    flat = {key: rows[f"p_{name}"].reshape(-1, width) for key, name in names.items()}
    passages = grm.embed(flat, ids.repeat_interleave(group), 1).reshape(batch, group, -1)
    keys = PairKeys(torch.as_tensor(rows["q_key"]), torch.as_tensor(rows["p_key"]))
    exit_term = contrastive_loss(queries, passages, 0.05, cross_device=False, keys=keys).loss
    assert exit_term.item() > 0.1
    torch.testing.assert_close(joint, base + 0.5 * exit_term, rtol=1e-5, atol=1e-5)


def test_grad_cache_chunks_give_the_same_exit_loss() -> None:
    grm = _plain_grm()
    rows = embedding_rows(grm, rank=0)
    cfg = LossConfig(temperature=0.05, exit_layers=[1])
    whole, _ = JointObjective(grm, cfg)(rows, None)
    chunked, _ = JointObjective(grm, cfg, grad_cache_chunk=2)(rows, None)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_exit_term_gradients_stop_below_the_exit() -> None:
    """The exit's InfoNCE alone moves the adapters of the layers below the exit, never those above it."""
    grm = _plain_grm()
    rows = embedding_rows(grm, rank=0)
    objective = JointObjective(grm, LossConfig(temperature=0.05, contrastive_weight=1.0, exit_layers=[1]))
    queries = objective._embed(rows["q_ids"], rows["q_mask"], rows["q_text"], grm.task_ids(list(rows["task"])))
    assert queries.shape[0] == 2  # (exit 1, last layer)
    queries[0].sum().backward()
    moved = {
        name.split(".layers.")[1].split(".")[0]
        for name, p in grm.named_parameters()
        if ".layers." in name and p.grad is not None and p.grad.abs().sum() > 0
    }
    assert moved == {"0"}


def test_the_trainers_step_trains_the_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's own train_step (test_loss_pin's fixed batch, tiny config, loss.exit_layers=[1]) applies its
    steps and the exit layer's InfoNCE on the repeated batch falls."""
    cfg = load_config(TrainConfig, str(TINY), ["loss.exit_layers=[1]"])
    torch.manual_seed(cfg.seed)
    grm = GRM.build(cfg.model.backbone, cfg.model.adapter.build(cfg.model.backbone))
    objective = JointObjective(grm, cfg.loss)
    exit_losses: list[float] = []
    exit_loss = objective._exit_loss

    def recorded(*args: object) -> torch.Tensor:
        loss = exit_loss(*args)
        exit_losses.append(loss.item())
        return loss

    monkeypatch.setattr(objective, "_exit_loss", recorded)
    engine = TorchEngine(objective, [p for p in objective.parameters() if p.requires_grad], cfg)
    sources, counts = _sources(cfg), {Mode.EMBEDDING: {"u2i": 2, "q2i": 2}}
    for step in range(1, 5):
        done = train_step(
            engine,
            sources,
            counts,
            grad_accum=1,
            cost=StepCost.of(grm.tuner.model),
            seed=cfg.seed,
            rank=0,
            step=step,
            device=torch.device("cpu"),
        )
        assert done.applied and set(done.losses) == {"u2i", "q2i"}
    assert len(exit_losses) == 4 and exit_losses[-1] < exit_losses[0]


def test_exit_layers_are_checked_against_the_backbone_before_training() -> None:
    with pytest.raises(ValidationError, match="counted from 1"):
        LossConfig(exit_layers=[0])
    assert LossConfig(exit_layers=[3, 1, 3]).exit_layers == [1, 3]
    with pytest.raises(ValidationError, match=r"loss.exit_layers \[2\]: the tiny backbone has 2 decoder layers"):
        TrainConfig.model_validate({"loss": {"exit_layers": [1, 2]}})
    assert TrainConfig.model_validate({"loss": {"exit_layers": [1]}}).loss.exit_layers == [1]
    smollm2 = {"model": {"backbone": {"name": "smollm2-135m"}}}
    with pytest.raises(ValidationError, match=f"has {SMOLLM2_LAYERS} decoder layers"):
        TrainConfig.model_validate(smollm2 | {"loss": {"exit_layers": [15, SMOLLM2_LAYERS]}})
    with pytest.raises(ValueError, match="loss.exit_layers=7"):
        JointObjective(_plain_grm(), LossConfig(exit_layers=[7]))


def test_backbone_depth_of_an_hf_checkpoint_is_read_from_its_config(tmp_path: Path) -> None:
    AutoConfig.for_model("llama", num_hidden_layers=5).save_pretrained(tmp_path)
    assert backbone_depth(BackboneConfig(name="hf", path=str(tmp_path))) == 5
    assert backbone_depth(BackboneConfig(name="hf", path=str(tmp_path / "missing"))) is None


# --- evaluation ----------------------------------------------------------------------------------------------------
def test_eval_system_embeds_at_its_exit_layer(grm: GRM) -> None:
    system = GRMSystem("recfound", grm, batch_size=2, exit_layer=1)
    got = system.embed("q2i", INSTRUCTIONS, TEXTS, Side.QUERY)
    want = grm.embed(
        encode_embedding(grm.tokenizer, INSTRUCTIONS, TEXTS, grm.backbone.max_query_len), grm.task_ids(["q2i"] * 3), 1
    )
    np.testing.assert_allclose(got, want.detach().numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="exit_layer=3"):
        GRMSystem("recfound", grm, exit_layer=3)


def test_evaluate_job_at_an_exit_layer(synthetic_dataset: Path, tmp_path: Path, capsys) -> None:
    adapter = tmp_path / "adapter"
    tiny_grm().save_pretrained(str(adapter))
    common = [f"model={adapter}", f"data={synthetic_dataset}", "baselines=none", "protocols=pool", "tasks=q2i"]
    assert run_job(*common, f"out={tmp_path / 'full'}") == 0
    assert run_job(*common, "exit_layer=1", f"out={tmp_path / 'exit'}") == 0
    full, early = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("full", "exit"))
    assert early["config"]["exit_layer"] == 1 and full["config"]["exit_layer"] is None
    metric = "pool.mrr@20"
    assert 0 <= early["systems"]["recfound"]["q2i"][metric] <= 1
    assert early["systems"]["recfound"]["q2i"] != full["systems"]["recfound"]["q2i"]
    capsys.readouterr()
    assert run_job(*common, "exit_layer=3", f"out={tmp_path / 'bad'}") == 1
    assert "exit_layer=3: the model's backbone (tiny) has 2 decoder layers" in capsys.readouterr().err


# --- export --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_merged(tmp_path_factory.mktemp("exit-export"))


@pytest.mark.parametrize("fmt", ["safetensors", "onnx"])
def test_export_at_an_exit_layer_is_a_k_layer_model_with_the_exit_vectors(
    merged: Path, tmp_path: Path, fmt: str
) -> None:
    if fmt == "onnx":  # the optional `export` extra
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    out = export(ExportConfig(model=str(merged), task="q2i", out=str(tmp_path / "e"), exit_layer=1, format=fmt))
    assert AutoConfig.from_pretrained(str(out)).num_hidden_layers == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["exit_layer"] == 1
    assert manifest["embedding"]["layers"] == 1 and manifest["embedding"]["backbone_layers"] == 2
    full = export(ExportConfig(model=str(merged), task="q2i", out=str(tmp_path / "full"), format=fmt))
    model_file = "model.onnx" if fmt == "onnx" else "model.safetensors"
    assert (out / model_file).stat().st_size < (full / model_file).stat().st_size
    exported = load_export(out)
    assert isinstance(exported, ExportedEmbedder)
    vectors = exported.embed(TEXTS, "Find the item", Side.QUERY)
    grm = GRM.from_pretrained(str(merged / "adapter")).eval()
    batch = encode_embedding(grm.tokenizer, ["Find the item"] * 3, TEXTS, grm.backbone.max_query_len)
    with torch.no_grad():
        want = grm.embed(batch, grm.task_ids(["q2i"] * 3), exit_layer=1).numpy()
    assert (vectors * want).sum(-1).min() >= 0.9999


def test_export_refuses_a_bad_exit_layer(merged: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="exit_layer=3: the backbone has 2 decoder layers"):
        export(ExportConfig(model=str(merged), task="q2i", out=str(tmp_path / "e"), exit_layer=3))
    with pytest.raises(ValidationError, match="exit_layer exits embedding tasks"):
        ExportConfig(model=str(merged), task="sentiment_analysis", out=str(tmp_path / "g"), exit_layer=1)
    with pytest.raises(ValidationError, match="exit_layer"):
        ExportConfig(model=str(merged), task="q2i", out=str(tmp_path / "z"), exit_layer=0)

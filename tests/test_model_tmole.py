"""TMoLE tuner: trainability, routing and mode masks, fast paths, merging, checkpointing, save/load."""

import dataclasses
import json
import threading

import pytest
import torch
from transformers import LlamaForCausalLM

from recfound.model.backbone import BackboneConfig
from recfound.model.pretrained import load_backbone
from recfound.model.tmole import ExpertGroups, TMoLEConfig, TMoLELayer, TMoLEModel
from recfound.model.tmole.routing import current_routing
from recfound.tasks import TASK_ID, Mode

# float32: folded/merged weights compute (W0 + dW) x instead of W0 x + B(A x); logits (|l| ~ 3) then differ by ~1e-6
TOL = {"atol": 1e-5, "rtol": 1e-5}

pytestmark = pytest.mark.usefixtures("one_thread")


def make(seed: int = 0, **config) -> TMoLEModel:
    """Tiny backbone + TMoLE with perturbed adapters (B starts at zero, which would hide every routing effect)."""
    model, _ = load_backbone(BackboneConfig())
    torch.manual_seed(seed)
    tuner = TMoLEModel(model, TMoLEConfig(**config))
    with torch.no_grad():
        for p in tuner.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return tuner


def ids(*tasks: str) -> torch.Tensor:
    return torch.tensor([TASK_ID[t] for t in tasks])


TOKENS = torch.tensor([[5, 40, 41, 42, 43, 44, 45, 46], [7, 50, 51, 52, 53, 54, 55, 56]])


def test_only_tmole_parameters_train_and_base_stays_fixed():
    tuner = make()
    trainable = {n for n, p in tuner.named_parameters() if p.requires_grad}
    assert trainable and all("tmole_" in n for n in trainable)
    # 2 layers x 4 projections x (A, B, router weight, router bias) + the task table
    assert len(trainable) == 2 * 4 * 4 + 1
    frozen = {n: p.detach().clone() for n, p in tuner.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in tuner.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in tuner.parameters() if p.requires_grad], lr=0.1)
    tuner(input_ids=TOKENS, labels=TOKENS, task_ids=ids("query_rewriting", "user_profile")).loss.backward()
    opt.step()
    for name, p in tuner.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert not torch.equal(p, adapter[name]), name
        else:
            assert p.grad is None, name
            assert torch.equal(p, frozen[name]), name


def test_layers_to_transform_adapts_only_those_layers_and_backward_stops_there():
    """Only layer 1 of 2 gets experts; layer 0 runs without a graph (its activations are not kept for backward)."""
    tuner = make(layers_to_transform=[1])
    adapted = {n for n, m in tuner.named_modules() if isinstance(m, TMoLELayer)}
    assert adapted and all(".layers.1." in n for n in adapted) and len(adapted) == 4
    reached: list[bool] = []
    layer0 = tuner.model.model.layers[0]
    layer0.register_forward_hook(
        lambda module, args, out: reached.append(out[0].requires_grad if isinstance(out, tuple) else out.requires_grad)
    )
    loss = tuner(input_ids=TOKENS, labels=TOKENS, task_ids=ids("query_rewriting", "user_profile")).loss
    loss.backward()
    assert reached == [False]
    assert all(p.grad is not None for n, p in tuner.named_parameters() if p.requires_grad and "layers.1." in n)
    with pytest.raises(ValueError, match="the backbone has layers 0-1"):
        make(layers_to_transform=[1, 2])
    with pytest.raises(ValueError, match="non-empty layer indexes"):
        TMoLEConfig(layers_to_transform=[])


def test_different_tasks_route_differently_and_same_task_identically():
    tuner = make()
    for name, gates in tuner.task_gates(ids("u2i", "q2i", "u2i"), Mode.EMBEDDING).items():
        assert not torch.allclose(gates[0], gates[1]), name
        assert torch.equal(gates[0], gates[2]), name
        torch.testing.assert_close(gates.sum(-1), torch.ones(3))


def test_three_groups_mask_the_other_mode_and_share_the_middle():
    tuner = make()  # E = 6: experts 0-1 embedding-only, 2-3 shared, 4-5 generation-only
    for gates in tuner.task_gates(ids("u2i", "q2i", "i2i"), Mode.EMBEDDING).values():
        assert (gates[:, 4:] == 0).all() and (gates[:, :4] > 0).all()
    for gates in tuner.task_gates(ids("query_rewriting", "item_profile"), Mode.GENERATIVE).values():
        assert (gates[:, :2] == 0).all() and (gates[:, 2:] > 0).all()


def test_two_groups_have_no_shared_experts():
    tuner = make(groups=ExpertGroups.TWO)  # experts 0-2 embedding-only, 3-5 generation-only
    assert all(len(modes) == 1 for modes in tuner.adapter_config.expert_modes())
    for gates in tuner.task_gates(ids("u2i", "i2i"), Mode.EMBEDDING).values():
        assert (gates[:, 3:] == 0).all() and (gates[:, :3] > 0).all()
    for gates in tuner.task_gates(ids("sentiment_analysis"), Mode.GENERATIVE).values():
        assert (gates[:, :3] == 0).all() and (gates[:, 3:] > 0).all()


def test_one_shared_expert_is_a_single_lora_used_by_every_task():
    tuner = make(num_experts=1, groups=ExpertGroups.SHARED)
    for mode, tasks in ((Mode.EMBEDDING, ("u2i", "i2i")), (Mode.GENERATIVE, ("sentiment_analysis",))):
        for gates in tuner.task_gates(ids(*tasks), mode).values():
            assert torch.equal(gates, torch.ones(len(tasks), 1))


def test_train_config_rejects_experts_that_do_not_fit_the_groups():
    from recfound.train.config import AdapterConfig

    assert AdapterConfig(num_experts=1, groups=ExpertGroups.SHARED).build(BackboneConfig()).num_experts == 1
    with pytest.raises(ValueError, match="groups=three needs num_experts divisible by 3, got 4"):
        AdapterConfig(num_experts=4)


def test_the_training_configs_adapter_section_is_tmole_configs_own_fields():
    """One adapter schema: the keys, defaults and docs of ``model.adapter`` are TMoLEConfig's (peft's field help),
    and what TMoLEConfig rejects the training config rejects before Ray starts."""
    from recfound.config import ConfigError, load_config
    from recfound.model.tmole.hyperparameters import HYPERPARAMETERS
    from recfound.train.config import AdapterConfig, TrainConfig

    tmole = {f.name: f for f in dataclasses.fields(TMoLEConfig)}
    assert tuple(AdapterConfig.model_fields) == HYPERPARAMETERS
    for name, field in AdapterConfig.model_fields.items():
        assert field.description == tmole[name].metadata["help"]
        assert field.get_default(call_default_factory=True) == TMoLEConfig().__dict__[name] or name == "target_modules"
    built = AdapterConfig(r=8, dropout=0.0).build(BackboneConfig())
    assert (built.r, built.dropout, built.tasks) == (8, 0.0, TMoLEConfig().tasks)
    for bad, message in (("dropout=1.5", "dropout"), ("alpha=0", "alpha"), ("r=0", "r and task_dim")):
        with pytest.raises(ConfigError, match=message):
            load_config(TrainConfig, None, [f"model.adapter.{bad}"])


def test_task_of_the_wrong_mode_or_unknown_is_rejected():
    tuner = make()
    with pytest.raises(ValueError, match="not generative tasks"):
        tuner.routing(ids("u2i"), Mode.GENERATIVE)
    with pytest.raises(ValueError, match="not embedding tasks"):
        tuner.routing(torch.tensor([99]), Mode.EMBEDDING)


def test_layers_refuse_to_run_without_routing_and_routing_is_thread_local():
    tuner = make()
    with pytest.raises(RuntimeError, match="without a task"):
        tuner.model(input_ids=TOKENS)
    seen = []
    with tuner.route(ids("u2i"), Mode.EMBEDDING):
        assert current_routing() is not None
        thread = threading.Thread(target=lambda: seen.append(_routing_or_none()))
        thread.start()
        thread.join()
    assert seen == [None]
    assert _routing_or_none() is None


def _routing_or_none():
    try:
        return current_routing()
    except RuntimeError:
        return None


def _logits(tuner: TMoLEModel, tasks: torch.Tensor, mode: Mode = Mode.GENERATIVE) -> torch.Tensor:
    return tuner(input_ids=TOKENS, task_ids=tasks, mode=mode).logits


def test_on_a_bf16_backbone_the_experts_compute_in_bf16_and_train_float32_weights():
    """As under autocast: the experts' matmuls run in the backbone's bf16 (upcasting the input ran them at a CPU's
    float32 rate), while their weights, and so their gradients and the optimizer's state, stay float32."""
    model, _ = load_backbone(BackboneConfig(dtype="bfloat16"))
    torch.manual_seed(0)
    tuner = TMoLEModel(model, TMoLEConfig(dropout=0.0))
    layer = next(m for m in tuner.modules() if isinstance(m, TMoLELayer))
    a, b = layer.tmole_A["default"], layer.tmole_B["default"]
    with torch.no_grad():
        b.add_(torch.randn_like(b) * 0.05)
    assert a.dtype == b.dtype == torch.float32 and layer.get_base_layer().weight.dtype == torch.bfloat16
    x = torch.randn(2, 3, layer.in_features, dtype=torch.bfloat16)
    with tuner.route(ids("query_rewriting", "user_profile"), Mode.GENERATIVE):
        routing = current_routing()
        out = layer._experts(x, "default", routing)
        experts, r, _ = a.shape
        scale = (layer.gates("default", routing) * layer.scaling["default"]).repeat_interleave(r, dim=-1)
        hidden = torch.nn.functional.linear(x, a.reshape(experts * r, -1).bfloat16()) * scale[:, None].bfloat16()
        want = torch.nn.functional.linear(hidden, b.permute(1, 0, 2).reshape(layer.out_features, -1).bfloat16())
        assert out.dtype == torch.bfloat16 and torch.equal(out, want)
        out.float().sum().backward()
    assert a.grad is not None and a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


def test_folded_single_task_path_matches_expert_sum_and_tracks_weight_updates():
    tuner = make().eval()
    tasks = ids("query_rewriting", "query_rewriting")
    layers = [m for m in tuner.modules() if isinstance(m, TMoLELayer)]
    with torch.enable_grad():  # grad enabled: per-sample expert sum
        expected = _logits(tuner, tasks).detach()
    assert not any(layer._folded for layer in layers)
    with torch.no_grad():
        folded = _logits(tuner, tasks)
        assert all(layer._folded for layer in layers)
        torch.testing.assert_close(folded, expected, **TOL)
        layers[0].tmole_B["default"].add_(0.05)  # an optimizer-like in-place update must invalidate the cache
        refolded = _logits(tuner, tasks)
    with torch.enable_grad():
        updated = _logits(tuner, tasks).detach()
    assert not torch.allclose(updated, expected)
    torch.testing.assert_close(refolded, updated, **TOL)


@pytest.mark.parametrize(("task", "mode"), [("answer_generation", Mode.GENERATIVE), ("i2i", Mode.EMBEDDING)])
def test_merge_task_gives_a_plain_model_with_the_same_outputs(task, mode):
    tuner = make().eval()
    expected = _logits(tuner, ids(task, task), mode).detach()
    merged = tuner.merge_task(task)
    assert isinstance(merged, LlamaForCausalLM)
    assert not any(isinstance(m, TMoLELayer) for m in merged.modules())
    # mode only changes the expert mask; the plain model runs causally like the tuner call above
    torch.testing.assert_close(merged(input_ids=TOKENS).logits, expected, **TOL)
    torch.testing.assert_close(_logits(tuner, ids(task, task), mode), expected, atol=0, rtol=0)  # tuner untouched


def test_a_private_task_expert_moves_only_its_own_tasks_samples_and_folds_like_the_shared_ones(tmp_path):
    """The same seed with and without answer_generation's private expert (perturbed like the others): rows of other
    tasks in the same batch compute exactly what they did, the owner's rows differ, and its folded, merged and
    reloaded forms all agree with the per-sample sum."""
    plain, private = make(seed=3), make(seed=3, task_experts={"answer_generation": 2})
    assert {k for k in private.trainable_state_dict()} - set(plain.trainable_state_dict()) == {
        f"{name}.tmole_task_{side}.answer_generation" for name, _ in private._layers() for side in "AB"
    }
    shared = {k: v for k, v in private.trainable_state_dict().items() if ".tmole_task_" not in k}
    plain.load_trainable_state_dict(shared)  # the same shared experts, routers and table in both
    mixed = ids("answer_generation", "query_rewriting")
    with torch.enable_grad():
        without, with_private = _logits(plain.eval(), mixed).detach(), _logits(private.eval(), mixed).detach()
    assert torch.equal(with_private[1], without[1])
    assert not torch.allclose(with_private[0], without[0])
    own = ids("answer_generation", "answer_generation")
    with torch.enable_grad():
        expected = _logits(private, own).detach()
    with torch.no_grad():
        torch.testing.assert_close(_logits(private, own), expected, **TOL)  # the folded single-task path
    torch.testing.assert_close(private.merge_task("answer_generation")(input_ids=TOKENS).logits, expected, **TOL)
    private.save_pretrained(str(tmp_path))
    reloaded = TMoLEModel.from_pretrained(load_backbone(BackboneConfig())[0], str(tmp_path)).eval()
    with torch.enable_grad():
        torch.testing.assert_close(_logits(reloaded, own).detach(), expected, atol=0, rtol=0)
    (grads,) = torch.autograd.grad(
        _logits(private.train(), ids("query_rewriting")[:1].expand(2)).sum(),
        private.task_expert_parameters("answer_generation")[1],
        allow_unused=True,
    )
    assert grads is None  # another task's batch never reaches the private expert


def test_task_experts_must_name_tasks_with_a_positive_rank():
    with pytest.raises(ValueError, match="task_experts"):
        TMoLEConfig(task_experts={"answer_generation": 0})
    with pytest.raises(ValueError, match="task_experts"):
        TMoLEConfig(tasks=["u2i"], task_experts={"i2i": 1})


def test_gradient_checkpointing_replays_with_the_forward_routing():
    plain, checkpointed = make(seed=1, dropout=0.0), make(seed=1, dropout=0.0)
    checkpointed.enable_gradient_checkpointing()
    grads = []
    for tuner in (plain, checkpointed):
        tuner.train()
        out = tuner(input_ids=TOKENS, labels=TOKENS, task_ids=ids("query_rewriting", "user_profile"))
        out.loss.backward()
        grads.append({n: p.grad for n, p in tuner.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_save_load_round_trip_is_exact_and_pickle_free(tmp_path):
    tuner = make().eval()
    tuner.save_pretrained(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["tasks"][TASK_ID["i2i"]] == "i2i" and saved["peft_type"] == "TMOLE" and saved["groups"] == "three"
    fresh, _ = load_backbone(BackboneConfig())
    loaded = TMoLEModel.from_pretrained(fresh, str(tmp_path)).eval()
    for key, value in tuner.trainable_state_dict().items():
        assert torch.equal(loaded.trainable_state_dict()[key], value), key
    tasks = ids("u2i", "q2i")
    assert torch.equal(_logits(loaded, tasks, Mode.EMBEDDING), _logits(tuner, tasks, Mode.EMBEDDING))


def test_trainable_state_dict_is_plain_tensors_and_loads_back():
    tuner = make()
    snapshot = {k: v.clone() for k, v in tuner.trainable_state_dict().items()}
    with torch.no_grad():
        for p in tuner.parameters():
            if p.requires_grad:
                p.zero_()
    tuner.load_trainable_state_dict(snapshot)
    for key, value in tuner.trainable_state_dict().items():
        assert torch.equal(value, snapshot[key]), key


def test_corrupt_adapter_files_are_clear_errors(tmp_path):
    tuner = make()
    tuner.save_pretrained(str(tmp_path))
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt adapter weights"):
        tuner.load_pretrained(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt adapter config"):
        tuner.load_pretrained(str(tmp_path))


@pytest.mark.parametrize(
    ("other", "field"),
    [
        ({"tasks": ["u2i", "q2i", "query_rewriting"]}, "tasks"),
        ({"target_modules": ["q_proj", "v_proj"]}, "target_modules"),
        ({"num_experts": 3}, "num_experts"),
        ({"groups": ExpertGroups.TWO}, "groups"),
    ],
)
def test_mismatched_adapter_config_names_the_field(tmp_path, other, field):
    make(**other).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=f"does not match this TMoLE model: .*{field}: saved"):
        make().load_pretrained(str(tmp_path))


def test_mismatched_tensors_name_the_keys_and_shapes():
    tuner = make()
    state = {k: v.clone() for k, v in tuner.trainable_state_dict().items()}
    state["model.layers.0.self_attn.q_proj.tmole_A"] = torch.zeros(6, 16, 32)
    del state["model.layers.1.self_attn.o_proj.tmole_B"]
    state["model.layers.0.mlp.up_proj.tmole_A"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        tuner.load_trainable_state_dict(state)
    message = str(err.value)
    assert "missing keys (1): model.layers.1.self_attn.o_proj.tmole_B" in message
    assert "unexpected keys (1): model.layers.0.mlp.up_proj.tmole_A" in message
    assert "model.layers.0.self_attn.q_proj.tmole_A: (6, 16, 32) vs model (6, 16, 64)" in message

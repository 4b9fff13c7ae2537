"""The step's FLOP estimate (the FLOP share / MFU in every training log line) against torch's own FLOP counter."""

from __future__ import annotations

import pytest
import torch
from test_loss_pin import TINY, joint_batch

from recfound.bench.common import counted_flops
from recfound.config import load_config
from recfound.model.grm import GRM
from recfound.train.config import TrainConfig
from recfound.train.objective import JointObjective
from recfound.train.telemetry import StepCost


def _step(layers: list[int] | None) -> tuple[float, float, StepCost]:
    """(StepCost's estimate, FlopCounterMode's count) of one forward + backward of the tiny model's joint step."""
    cfg = load_config(TrainConfig, str(TINY), [])
    adapter = cfg.model.adapter.model_copy(update={"layers_to_transform": layers})
    torch.manual_seed(0)
    grm = GRM.build(cfg.model.backbone, adapter.build(cfg.model.backbone))
    objective = JointObjective(grm, cfg.loss, cfg.batch.grad_cache_chunk)
    emb, gen = joint_batch(cfg)
    counted = counted_flops(lambda: objective(emb, gen)[0].backward())
    cost = StepCost.of(grm.tuner.model)
    return cost.batches(emb, gen), counted, cost


@pytest.mark.parametrize("layers", [None, [1]], ids=["every layer", "top layer"])
def test_step_cost_matches_torchs_flop_counter(layers: list[int] | None, one_thread: None) -> None:
    """Within 10 % of FlopCounterMode (which counts matmuls and attention, forward and backward, as they run);
    adapting only the top layer removes the lower layer's backward from both."""
    estimate, counted, cost = _step(layers)
    assert cost.backward_layers == (2 if layers is None else 1) and cost.layers == 2
    assert estimate == pytest.approx(counted, rel=0.1)

"""The first optimizer steps of the tiny model's training step, pinned (as torchtune pins its recipes' losses).

One process, no Ray: the tiny config's model, objective and engine (AdamW, LR schedule, clipping) driven by the
trainer's own ``train_step`` on one rank (DDP on one rank adds nothing to the numbers), on one fixed batch of
hand-written rows tokenised by ``tokenize``. A change anywhere on that path
(model init, TMoLE routing, formats, losses, AdamW / schedule / clip, seeding) moves these numbers: if the change is
intended, re-pin with ``.venv/bin/python tests/test_loss_pin.py`` and paste its output over PINNED.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from recfound.config import load_config
from recfound.tasks import Mode
from recfound.train.batches import collate, tokenize
from recfound.train.config import TrainConfig
from recfound.train.engine import TorchEngine
from recfound.train.objective import JointObjective
from recfound.train.step import train_step
from recfound.train.telemetry import StepCost

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
STEPS = 5

# Per step: {task: mean loss of its queries / response tokens, over all ranks}. Measured on the 2-core CI machine in
# fp32 (bit-identical over runs, with 1 or 2 threads, deterministic algorithms on or off); re-pin as the module
# doc says.
PINNED: list[dict[str, float]] = [
    {
        "q2i": 1.4862905740737915,
        "sentiment_analysis": 6.533853318956163,
        "sequential_recommendation": 7.506936073303223,
        "u2i": 7.741579532623291,
    },
    {
        "q2i": 0.994291365146637,
        "sentiment_analysis": 6.471424102783203,
        "sequential_recommendation": 7.401218891143799,
        "u2i": 6.247036933898926,
    },
    {
        "q2i": 0.35014304518699646,
        "sentiment_analysis": 6.334908803304036,
        "sequential_recommendation": 7.176381587982178,
        "u2i": 3.6687469482421875,
    },
    {
        "q2i": 0.11433480679988861,
        "sentiment_analysis": 6.197263081868489,
        "sequential_recommendation": 6.913081645965576,
        "u2i": 1.7860721349716187,
    },
    {
        "q2i": 0.05396090820431709,
        "sentiment_analysis": 6.057251824273004,
        "sequential_recommendation": 6.69622802734375,
        "u2i": 0.3456890285015106,
    },
]


def _embedding_rows(task: str, queries: list[str], items: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    """Raw rows of an embedding task as the builder writes them: a query, its positive and one hard negative."""
    return {
        "task": np.array([task] * len(queries)),
        "query_instruction": np.array([f"Find the item for this {task} query"] * len(queries)),
        "query": np.array(queries),
        "pos_instruction": np.array(["Represent this item"] * len(queries)),
        "pos": np.array([pos for pos, _ in items]),
        "pos_item": np.array([f"{task}-p{i}" for i in range(len(queries))]),
        "neg": np.array([[neg] for _, neg in items]),
        "neg_items": np.array([[f"{task}-n{i}"] for i in range(len(queries))]),
    }


def _generative_rows(task: str, pairs: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    return {
        "task": np.array([task] * len(pairs)),
        "prompt": np.array([p for p, _ in pairs]),
        "response": np.array([r for _, r in pairs]),
    }


class _Fixed:
    """A task's rows, the same every step (the stream the trainer reads, reduced to one fixed batch)."""

    def __init__(self, rows: dict[str, np.ndarray], backbone: dict) -> None:
        self.batch = tokenize(rows, backbone, str(rows["task"][0]))

    def take(self, n: int) -> dict[str, np.ndarray]:
        assert n == len(self.batch["task"])
        return self.batch


def _sources(cfg: TrainConfig) -> dict[str, _Fixed]:
    """Two embedding and two generative tasks, two rows each: routing by task and mode is on the path."""
    backbone = cfg.model.backbone.model_dump()
    rows = [
        _embedding_rows(
            "u2i",
            ["1. red mug\n2. blue mug", "1. trail shoes\n2. socks"],
            [("green mug", "garden hose"), ("running cap", "coffee beans")],
        ),
        _embedding_rows(
            "q2i",
            ["mug for tea", "waterproof hiking boots"],
            [("ceramic tea mug 350 ml", "usb cable"), ("leather hiking boots", "desk lamp")],
        ),
        _generative_rows(
            "sentiment_analysis",
            [
                ("Review: great mug, keeps tea hot. Sentiment?", "positive"),
                ("Review: broke after a day. Sentiment?", "negative"),
            ],
        ),
        _generative_rows(
            "sequential_recommendation",
            [
                ("History: red mug, blue mug. Options: A: green mug B: hose", "A"),
                ("History: boots, socks. Options: A: lamp B: cap", "B"),
            ],
        ),
    ]
    return {str(r["task"][0]): _Fixed(r, backbone) for r in rows}


def joint_batch(cfg: TrainConfig) -> tuple[dict, dict]:
    """The fixed rows as one step's (embedding, generative) batches, as ``train_step`` collates them."""
    sources = _sources(cfg)
    modes = {Mode.EMBEDDING: ["u2i", "q2i"], Mode.GENERATIVE: ["sentiment_analysis", "sequential_recommendation"]}
    emb, gen = (collate([sources[t].batch for t in tasks], mode) for mode, tasks in modes.items())
    return emb, gen


def first_steps(steps: int = STEPS) -> list[dict[str, float]]:
    """The trainer's ``train_step`` on one rank (the engine without its DDP wrapper), ``steps`` times on the same
    batch: the per-task losses of each step."""
    from recfound.model.grm import GRM

    cfg = load_config(TrainConfig, str(TINY), [])
    torch.manual_seed(cfg.seed)
    grm = GRM.build(cfg.model.backbone, cfg.model.adapter.build(cfg.model.backbone))
    objective = JointObjective(grm, cfg.loss, cfg.batch.grad_cache_chunk)
    engine = TorchEngine(objective, [p for p in objective.parameters() if p.requires_grad], cfg)
    sources = _sources(cfg)
    counts = {
        Mode.EMBEDDING: {"u2i": 2, "q2i": 2},
        Mode.GENERATIVE: {"sentiment_analysis": 2, "sequential_recommendation": 2},
    }
    out = []
    for step in range(1, steps + 1):
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
        assert done.applied and done.non_finite is None
        out.append(dict(sorted(done.losses.items())))
    return out


@pytest.fixture
def deterministic(one_thread) -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_first_steps_of_the_tiny_model_match_the_pinned_losses(deterministic) -> None:
    """The per-task losses of the first 5 optimizer steps equal PINNED (rel 1e-4: float noise of another CPU or
    BLAS is ~1e-6; any change to the model, objective, optimizer or seeding moves them far more), and the step
    learns: both modes' losses fall on the repeated batch."""
    got = first_steps()
    assert [step.keys() for step in got] == [step.keys() for step in PINNED]
    for step, (tasks, want) in enumerate(zip(got, PINNED, strict=True), start=1):
        assert tasks == pytest.approx(want, rel=1e-4), (step, tasks, want)
    first, last = got[0], got[-1]
    assert last["u2i"] < first["u2i"] and last["sentiment_analysis"] < first["sentiment_analysis"]


if __name__ == "__main__":  # re-pin: prints PINNED's new value
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    print("PINNED: list[dict[str, float]] = [")
    for tasks in first_steps():
        pairs = [f"{t!r}: {v!r}" for t, v in tasks.items()]
        print(f"    {{{', '.join(pairs[:2])},\n     {', '.join(pairs[2:])}}},")
    print("]")

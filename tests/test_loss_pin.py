"""The first optimizer steps of the tiny model's training step, pinned (as torchtune pins its recipes' losses).

One process, no Ray: the tiny config's model, objective, optimizer, LR schedule, clipping and per-step dropout seed,
driven as ``train_worker`` drives them on one rank (DDP on one rank adds nothing to the numbers), on one fixed
batch of hand-written rows tokenised by ``tokenize`` and joined by ``collate``. A change anywhere on that path
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
from recfound.train.engine import clipped_step
from recfound.train.loop import step_seed
from recfound.train.objective import FALSE_NEGATIVES, JointObjective
from recfound.train.optim import build_lr_schedule, build_optimizer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
STEPS = 5

# Per step: (total loss, {task: mean loss of its queries / response tokens}). Measured on the 2-core CI machine in
# fp32 (bit-identical over runs, with 1 or 2 threads, deterministic algorithms on or off); re-pin as the module
# doc says.
PINNED: list[tuple[float, dict[str, float]]] = [
    (11.324712753295898, {"q2i": 1.4862905740737915, "sentiment_analysis": 6.533853530883789,
                          "sequential_recommendation": 7.506936073303223, "u2i": 7.741579532623291}),
    (10.257023811340332, {"q2i": 1.0406783819198608, "sentiment_analysis": 6.451887130737305,
                          "sequential_recommendation": 7.402148246765137, "u2i": 6.224045276641846}),
    (8.46910285949707, {"q2i": 0.41219010949134827, "sentiment_analysis": 6.279901027679443,
                        "sequential_recommendation": 7.15648078918457, "u2i": 3.647459030151367}),
    (7.192328929901123, {"q2i": 0.13839693367481232, "sentiment_analysis": 6.106924533843994,
                         "sequential_recommendation": 6.870429039001465, "u2i": 1.7547746896743774}),
    (6.268587589263916, {"q2i": 0.06659726798534393, "sentiment_analysis": 5.938679218292236,
                         "sequential_recommendation": 6.602377891540527, "u2i": 0.3518745005130768}),
]  # fmt: skip


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
    return {"task": np.array([task] * len(pairs)), "prompt": np.array([p for p, _ in pairs]),
            "response": np.array([r for _, r in pairs])}  # fmt: skip


def _batch(cfg: TrainConfig) -> tuple[dict, dict]:
    """Two embedding and two generative tasks, two rows each: routing by task and mode is on the path."""
    backbone = cfg.model.backbone.model_dump()
    emb = [
        _embedding_rows("u2i", ["1. red mug\n2. blue mug", "1. trail shoes\n2. socks"],
                        [("green mug", "garden hose"), ("running cap", "coffee beans")]),
        _embedding_rows("q2i", ["mug for tea", "waterproof hiking boots"],
                        [("ceramic tea mug 350 ml", "usb cable"), ("leather hiking boots", "desk lamp")]),
    ]  # fmt: skip
    gen = [
        _generative_rows("sentiment_analysis", [("Review: great mug, keeps tea hot. Sentiment?", "positive"),
                                                ("Review: broke after a day. Sentiment?", "negative")]),
        _generative_rows("sequential_recommendation", [("History: red mug, blue mug. Options: A: green mug B: hose",
                                                        "A"), ("History: boots, socks. Options: A: lamp B: cap", "B")]),
    ]  # fmt: skip
    emb_rows = collate([tokenize(rows, backbone, str(rows["task"][0])) for rows in emb], Mode.EMBEDDING)
    gen_rows = collate([tokenize(rows, backbone, str(rows["task"][0])) for rows in gen], Mode.GENERATIVE)
    return emb_rows, gen_rows


def first_steps(steps: int = STEPS) -> list[tuple[float, dict[str, float]]]:
    """``train_worker``'s step on one rank, ``steps`` times on the same batch: (loss, per-task losses) per step."""
    from recfound.model.grm import GRM

    cfg = load_config(TrainConfig, str(TINY), [])
    torch.manual_seed(cfg.seed)
    grm = GRM.build(cfg.model.backbone, cfg.model.adapter.build(cfg.model.backbone))
    objective = JointObjective(grm, cfg.loss, cfg.batch.grad_cache_chunk)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim)
    schedule = build_lr_schedule(optimizer, cfg.optim, cfg.max_steps)
    emb, gen = _batch(cfg)
    out = []
    for step in range(1, steps + 1):
        torch.manual_seed(step_seed(cfg.seed, 0, step))
        optimizer.zero_grad(set_to_none=True)
        loss, stats = objective(emb, gen)
        (loss / cfg.optim.grad_accum).backward()
        assert clipped_step(params, optimizer, cfg.optim.grad_clip)
        schedule.step()
        stats.pop(FALSE_NEGATIVES)
        per_task = {str(task): (total / count).item() for task, (total, count) in sorted(stats.items())}
        out.append((loss.item(), per_task))
    return out


@pytest.fixture
def deterministic(one_thread) -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_first_steps_of_the_tiny_model_match_the_pinned_losses(deterministic) -> None:
    """The total and per-task losses of the first 5 optimizer steps equal PINNED (rel 1e-4: float noise of another
    CPU or BLAS is ~1e-6; any change to the model, objective, optimizer or seeding moves them far more), and the
    step learns: both modes' losses fall on the repeated batch."""
    got = first_steps()
    assert [step[1].keys() for step in got] == [step[1].keys() for step in PINNED]
    for step, ((loss, tasks), (want_loss, want_tasks)) in enumerate(zip(got, PINNED, strict=True), start=1):
        assert loss == pytest.approx(want_loss, rel=1e-4), (step, loss, want_loss)
        assert tasks == pytest.approx(want_tasks, rel=1e-4), (step, tasks, want_tasks)
    first, last = got[0][1], got[-1][1]
    assert last["u2i"] < first["u2i"] and last["sentiment_analysis"] < first["sentiment_analysis"]


if __name__ == "__main__":  # re-pin: prints PINNED's new value
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    print("PINNED: list[tuple[float, dict[str, float]]] = [")
    for loss, tasks in first_steps():
        print(f"    ({loss!r}, {{{', '.join(f'{t!r}: {v!r}' for t, v in tasks.items())}}}),")
    print("]")

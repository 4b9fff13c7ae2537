"""Unit tests of the training step's parts (no Ray, no real model): the Sampler's carried quotas, collate, the
JointObjective's combination of its two losses, rebase_lr on resume, and the serving replica's group-and-split."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from recfound.model.formats import IGNORE_INDEX
from recfound.model.losses import LossConfig
from recfound.tasks import Mode
from recfound.train.batches import collate, item_keys
from recfound.train.engine import rebase_lr
from recfound.train.mixing import Sampler
from recfound.train.objective import FALSE_NEGATIVES, JointObjective
from recfound.train.optim import OptimConfig, build_lr_schedule, build_optimizer
from recfound.train.popularity import ItemPrior
from recfound.train.step import StepResult, train_step
from recfound.train.telemetry import StepCost

# ------------------------------------------------------------------------------------------------------ Sampler

MIX = {"a": 0.7, "b": 0.25, "c": 0.05}


def _draw(sampler: Sampler, weights: dict[str, float], steps: int) -> list[dict[str, int]]:
    return [sampler.counts(weights) for _ in range(steps)]


def test_sampler_carries_fractions_so_a_small_task_gets_its_share() -> None:
    """Task c's quota is 0.2 samples a step: rounding each step alone would never pick it (quotas 2.8 / 1 / 0.2);
    the carried remainder gives it one sample in every 5 steps (once its carry, 0.6 at step 3, outbids a's), every
    step still sums to the batch, and the running totals stay within 1 sample of the mix."""
    draws = _draw(Sampler(list(MIX), 4), MIX, 100)
    assert all(sum(d.values()) == 4 for d in draws)
    assert [d["c"] for d in draws[:10]] == [0, 0, 1, 0, 0, 0, 0, 1, 0, 0]
    assert all(sum(d["c"] for d in draws[i : i + 5]) == 1 for i in range(0, 100, 5))
    totals = Counter()
    for step, draw in enumerate(draws, start=1):
        totals.update(draw)
        assert all(abs(totals[t] - MIX[t] * 4 * step) <= 1 for t in MIX), (step, totals)
    assert dict(totals) == {"a": 280, "b": 100, "c": 20}


def test_sampler_restored_carry_continues_like_the_uninterrupted_sampler() -> None:
    """Resume restores ``carry`` (trainer_state.json): the draws after it equal the uninterrupted run's, even when
    the weights change (an S2Sched update) after the restore; the same inputs always give the same draws."""
    later = {"a": 0.2, "b": 0.3, "c": 0.5}
    whole = Sampler(list(MIX), 5)
    reference = _draw(whole, MIX, 7) + _draw(whole, later, 9)
    first = Sampler(list(MIX), 5)
    head = _draw(first, MIX, 7)
    resumed = Sampler(list(MIX), 5)
    resumed.carry = dict(first.carry)
    assert head + _draw(resumed, later, 9) == reference
    again = Sampler(list(MIX), 5)
    assert _draw(again, MIX, 7) + _draw(again, later, 9) == reference
    fresh = Sampler(list(MIX), 5)  # without the carry, the draws after the "resume" would differ
    assert _draw(fresh, later, 9) != reference[7:]


def test_sampler_without_tasks_or_batch_draws_nothing() -> None:
    """A mode the run does not train (or a zero batch) takes no rows and never divides by zero."""
    assert Sampler([], 8).counts({}) == {}
    assert Sampler(["a"], 0).counts({"a": 1.0}) == {}


# ------------------------------------------------------------------------------------------------------ collate


def _emb_part(task: str, q_lens: list[int], p_lens: list[list[int]], width: int = 6) -> dict[str, np.ndarray]:
    """Right-padded embedding rows as ``tokenize`` makes them: ids 1..n on real tokens, 0 after."""

    def block(lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask = (np.arange(width) < lens[..., None]).astype(np.int64)
        return mask * (np.arange(width) + 1), mask

    q_ids, q_mask = block(np.array(q_lens))
    p_ids, p_mask = block(np.array(p_lens))
    n = len(q_lens)
    return {
        "task": np.array([task] * n),
        "q_ids": q_ids,
        "q_mask": q_mask,
        "q_text": q_mask.copy(),
        "p_ids": p_ids,
        "p_mask": p_mask,
        "p_text": p_mask.copy(),
        "q_key": np.arange(n, dtype=np.int64),
        "p_key": np.arange(2 * n, dtype=np.int64).reshape(n, 2),
    }


def test_collate_embedding_joins_tasks_and_trims_query_and_passage_sides_separately() -> None:
    """Rows keep their part order; queries are cut to the longest query (4), passages to the longest passage (3);
    keys pass through untrimmed; an empty part is dropped."""
    u2i = _emb_part("u2i", [2, 4], [[1, 3], [2, 2]])
    q2i = _emb_part("q2i", [1], [[3, 1]])
    empty = {k: v[:0] for k, v in _emb_part("i2i", [1], [[1, 1]]).items()}
    rows = collate([u2i, empty, q2i], Mode.EMBEDDING)
    assert rows is not None
    assert list(rows["task"]) == ["u2i", "u2i", "q2i"]
    assert rows["q_ids"].shape == rows["q_mask"].shape == rows["q_text"].shape == (3, 4)
    assert rows["p_ids"].shape == rows["p_mask"].shape == rows["p_text"].shape == (3, 2, 3)
    assert rows["q_ids"].tolist() == [[1, 2, 0, 0], [1, 2, 3, 4], [1, 0, 0, 0]]
    assert rows["p_mask"][0].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert rows["q_key"].tolist() == [0, 1, 0] and rows["p_key"].shape == (3, 2)


def test_collate_generative_keeps_ignore_index_labels_and_trims_to_the_longest_row() -> None:
    """Labels stay -100 on prompt and padding; all three columns are cut to the longest attention mask."""
    ids = np.array([[5, 6, 7, 0, 0, 0], [8, 9, 0, 0, 0, 0]])
    mask = (ids > 0).astype(np.int64)
    labels = np.array([[IGNORE_INDEX, 6, 7] + [IGNORE_INDEX] * 3, [IGNORE_INDEX, 9] + [IGNORE_INDEX] * 4])
    part = {"task": np.array(["sentiment_analysis", "title_generation"]), "ids": ids, "mask": mask, "labels": labels}
    rows = collate([part], Mode.GENERATIVE)
    assert rows is not None
    assert rows["ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert rows["mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert rows["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, IGNORE_INDEX]]


def test_collate_of_a_step_without_rows_is_none() -> None:
    """The loop passes None to the objective for a mode with no rows this step."""
    empty = {
        "task": np.array([], dtype=str),
        "ids": np.zeros((0, 4)),
        "mask": np.zeros((0, 4)),
        "labels": np.zeros((0, 4)),
    }
    assert collate([], Mode.GENERATIVE) is None
    assert collate([empty], Mode.GENERATIVE) is None


# --------------------------------------------------------------------------------------------- JointObjective

# Unit vectors by first token id: the fake GRM's "embedding" of a row.
VECTORS = {1: [1.0, 0.0], 2: [0.0, 1.0], 3: [0.6, 0.8], 4: [-1.0, 0.0]}


class FakeGRM(nn.Module):
    """What JointObjective uses of a GRM: task ids, embeddings (fixed per first token), per-token LM losses (the
    label id / 10, so the hand computation knows them)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def task_ids(self, tasks: list[str]) -> torch.Tensor:
        return torch.tensor([len(t) for t in tasks])

    def embed(self, batch: dict[str, np.ndarray], task_ids: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.tensor([VECTORS[int(i)] for i in np.asarray(batch["input_ids"])[:, 0]])

    def lm_token_losses(
        self, batch: dict[str, np.ndarray], task_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.as_tensor(batch["labels"])
        keep = labels != IGNORE_INDEX
        return self.scale * labels[keep].float() / 10, keep.nonzero()[:, 0]


def _emb_rows() -> dict[str, np.ndarray]:
    # query 0 = [1, 0] (positive [1, 0], hard negative [0.6, 0.8]); query 1 = [0, 1] ([0.6, 0.8], [-1, 0]).
    q_ids = np.array([[1, 9], [2, 9]])
    p_ids = np.array([[[1, 9], [3, 9]], [[3, 9], [4, 9]]])
    ones_q, ones_p = np.ones_like(q_ids), np.ones_like(p_ids)
    return {
        "task": np.array(["u2i", "q2i"]),
        "q_ids": q_ids,
        "q_mask": ones_q,
        "q_text": ones_q,
        "p_ids": p_ids,
        "p_mask": ones_p,
        "p_text": ones_p,
        "q_key": np.array([10, 11]),
        "p_key": np.array([[20, 21], [22, 23]]),
    }


def _gen_rows() -> dict[str, np.ndarray]:
    labels = np.array([[IGNORE_INDEX, 10, 20, 30], [IGNORE_INDEX, IGNORE_INDEX, 50, IGNORE_INDEX]])
    return {
        "task": np.array(["sentiment_analysis", "title_generation"]),
        "ids": np.ones((2, 4), dtype=np.int64),
        "mask": np.ones((2, 4), dtype=np.int64),
        "labels": labels,
    }


def test_joint_objective_is_weighted_infonce_plus_token_mean_ce() -> None:
    """loss = w_c * mean over queries of InfoNCE (every passage of the step a candidate) + w_g * mean over all
    response tokens of the step (not a mean of row means); per-task stats are (sum, count) of queries / tokens."""
    objective = JointObjective(FakeGRM(), LossConfig(temperature=0.5, contrastive_weight=0.5, generative_weight=2.0))
    loss, stats = objective(_emb_rows(), _gen_rows())
    # Cosines / 0.5 against the four candidates: query 0 [2, 1.2, 1.2, -2] (positive 0), query 1 [0, 1.6, 1.6, 0]
    # (positive 2).
    q0 = -2 + math.log(math.exp(2) + 2 * math.exp(1.2) + math.exp(-2))
    q1 = -1.6 + math.log(2 + 2 * math.exp(1.6))
    tokens = [1.0, 2.0, 3.0, 5.0]  # labels / 10 of the 4 response tokens (3 of row 0, 1 of row 1)
    assert loss.item() == pytest.approx(0.5 * (q0 + q1) / 2 + 2.0 * sum(tokens) / 4, rel=1e-6)
    assert {t: (s.item(), int(n)) for t, (s, n) in stats.items()} == {
        "u2i": (pytest.approx(q0, rel=1e-6), 1),
        "q2i": (pytest.approx(q1, rel=1e-6), 1),
        "sentiment_analysis": (pytest.approx(6.0), 3),
        "title_generation": (pytest.approx(5.0), 1),
        FALSE_NEGATIVES: (0, 2),
    }
    loss.backward()  # the combined loss reaches the model's parameters
    assert objective.grm.scale.grad is not None and objective.grm.scale.grad != 0


def test_joint_objective_with_one_mode_is_that_mode_alone_and_masks_false_negatives() -> None:
    """A step with no generative rows is w_c * InfoNCE; a passage that is query 0's positive item again (query 1's
    hard negative) is left out of query 0's denominator and counted under FALSE_NEGATIVES; a step with no
    embedding rows is w_g * token-mean CE."""
    cfg = LossConfig(temperature=0.5, contrastive_weight=0.5)
    rows = _emb_rows()
    rows["p_key"] = np.array([[20, 21], [22, 20]])
    loss, stats = JointObjective(FakeGRM(), cfg)(rows, None)
    q0 = -2 + math.log(math.exp(2) + 2 * math.exp(1.2))  # candidate 3 ([-1, 0], score -2) left out
    q1 = -1.6 + math.log(2 + 2 * math.exp(1.6))
    assert loss.item() == pytest.approx(0.5 * (q0 + q1) / 2, rel=1e-6)
    assert [int(v) for v in stats[FALSE_NEGATIVES]] == [1, 2]
    gen_only, _ = JointObjective(FakeGRM(), cfg)(None, _gen_rows())
    assert gen_only.item() == pytest.approx(11.0 / 4)


# ------------------------------------------------------------------------------------------------- train_step


class _Source:
    """A task's stream: every take returns the same generative rows, cut to n."""

    def __init__(self, task: str) -> None:
        self.rows = _gen_rows() | {"task": np.array([task, task])}
        self.taken: list[int] = []

    def take(self, n: int) -> dict[str, np.ndarray]:
        self.taken.append(n)
        return {k: v[:n] for k, v in self.rows.items()}


class _Engine:
    """Each call reports its per-task (loss sum, count) from ``losses``; counts backward and step calls."""

    def __init__(self, losses: list[dict[str, float]]) -> None:
        self.losses, self.calls, self.backwards, self.steps, self.zeroed = losses, 0, 0, 0, 0

    def __call__(self, emb: dict | None, gen: dict | None) -> tuple[torch.Tensor, dict]:
        assert emb is None and gen is not None
        stats = {t: (torch.tensor(v * 2), torch.tensor(2)) for t, v in self.losses[self.calls].items()}
        self.calls += 1
        return torch.tensor(0.0), stats

    def zero_grad(self) -> None:
        self.zeroed += 1

    def backward(self, loss: torch.Tensor) -> None:
        self.backwards += 1

    def step(self) -> bool:
        self.steps += 1
        return True


def _train_step(engine: _Engine, sources: dict[str, _Source], grad_accum: int) -> StepResult:
    counts = {Mode.EMBEDDING: {}, Mode.GENERATIVE: {t: 2 for t in sources}}
    cost = StepCost(
        layer_params=64, layers=1, backward_layers=1, input_params=16, width=4, head_params=64, adapter_params=8
    )
    return train_step(
        engine, sources, counts, grad_accum=grad_accum, cost=cost, seed=0, rank=0, step=1, device=torch.device("cpu")
    )


def test_train_step_accumulates_micro_batches_then_updates_once() -> None:
    """Two micro-batches: each task's loss is its mean over both, one zero_grad and one update per step, and the
    rows and tokens of both count."""
    sources = {"a": _Source("a"), "b": _Source("b")}
    engine = _Engine([{"a": 1.0, "b": 3.0}, {"a": 2.0, "b": 5.0}])
    done = _train_step(engine, sources, grad_accum=2)
    assert done.losses == pytest.approx({"a": 1.5, "b": 4.0}) and done.non_finite is None and done.applied
    assert (engine.calls, engine.backwards, engine.steps, engine.zeroed) == (2, 2, 1, 1)
    assert sources["a"].taken == [2, 2] and done.samples == 8 and done.tokens == 8 * 4 and done.flops > 0


def test_train_step_with_a_non_finite_loss_names_the_task_and_does_not_update() -> None:
    sources = {"a": _Source("a"), "b": _Source("b")}
    engine = _Engine([{"a": 1.0, "b": float("nan")}])
    done = _train_step(engine, sources, grad_accum=1)
    assert done.non_finite == "b" and not done.applied and engine.steps == 0


def test_item_prior_is_each_items_share_of_the_positives_and_unseen_items_count_once() -> None:
    prior = ItemPrior.from_counts({"a": 6, "b": 3})
    got = prior.lookup(np.stack([item_keys(["a", "b"]), item_keys(["zz", "a"])]))
    np.testing.assert_allclose(got, np.log([[0.6, 0.3], [0.1, 0.6]]), rtol=1e-6)


def test_joint_objective_refuses_logq_correction_without_a_prior() -> None:
    with pytest.raises(ValueError, match="logq_tasks needs the items' popularity prior"):
        JointObjective(FakeGRM(), LossConfig(logq_tasks=["u2i"]))


def test_joint_objective_corrects_only_the_logq_tasks_rows() -> None:
    """loss.logq_tasks=[u2i]: the u2i query's loss moves with the prior, the q2i query's stays the plain one."""
    prior = ItemPrior.from_counts({"a": 8, "b": 1})
    rows = _emb_rows() | {"p_key": np.tile(item_keys(["a", "b"]), (2, 1))}
    plain = JointObjective(FakeGRM(), LossConfig(temperature=0.5))(rows, None)[1]
    got = JointObjective(FakeGRM(), LossConfig(temperature=0.5, logq_tasks=["u2i"]), prior=prior)(rows, None)[1]
    assert got["q2i"][0].item() == pytest.approx(plain["q2i"][0].item())
    assert got["u2i"][0].item() != pytest.approx(plain["u2i"][0].item())


def test_logq_tasks_must_be_embedding_tasks() -> None:
    with pytest.raises(ValueError, match="sentiment_analysis"):
        LossConfig(logq_tasks=["sentiment_analysis"])


# -------------------------------------------------------------------------------------------------- rebase_lr


def _schedule(max_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    cfg = OptimConfig(lr=1.0, warmup_ratio=0.25)
    optimizer = build_optimizer([nn.Parameter(torch.zeros(2))], cfg)
    return optimizer, build_lr_schedule(optimizer, cfg, max_steps)


def test_rebase_lr_puts_a_resumed_run_on_its_own_schedule() -> None:
    """A run saved at step 4 of max_steps=4 (LR decayed to 0) and resumed with max_steps=8 continues at the LR the
    8-step schedule has at step 4 (rebase_lr), not at the saved 0; its later steps match an uninterrupted 8-step
    run's, and the step count is kept."""
    optimizer, schedule = _schedule(4)
    for _ in range(4):
        optimizer.step()
        schedule.step()
    assert schedule.get_last_lr() == [0.0]
    saved = {"optimizer": optimizer.state_dict(), "lr_schedule": schedule.state_dict()}

    reference_opt, reference = _schedule(8)
    lrs = []
    for _ in range(8):
        lrs.append(reference.get_last_lr()[0])
        reference_opt.step()
        reference.step()

    optimizer, schedule = _schedule(8)
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["lr_schedule"])
    assert schedule.get_last_lr() == [0.0]  # what a plain restore would train with
    rebase_lr(schedule)
    assert schedule.last_epoch == 4
    resumed = []
    for _ in range(4):
        resumed.append(schedule.get_last_lr()[0])
        assert optimizer.param_groups[0]["lr"] == resumed[-1]
        optimizer.step()
        schedule.step()
    assert resumed == pytest.approx(lrs[4:]) and resumed[0] == pytest.approx(4 / 6)

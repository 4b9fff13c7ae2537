"""S2Sched weights on hand-made loss curves, sample allocation, and the Ray actor's restart contract."""

from __future__ import annotations

import json
import math
import time

import pytest
import ray
from pydantic import ValidationError

from recfound.config import ConfigError, load_config
from recfound.train.mixing import allocate
from recfound.train.s2sched import (
    LossSource,
    S2Sched,
    ScheduleMode,
    SchedulerConfig,
    SchedulerLostState,
    get_or_create_scheduler,
)

EMB = ("u2i", "q2i", "i2i")
GEN = ("query_rewriting", "product_matching")
EQUAL_ROWS = dict.fromkeys(EMB + GEN, 100)
CFG = SchedulerConfig(warmup=8, history=16)


def curves(step: int) -> dict[str, float]:
    """u2i converges fast, q2i slowly, i2i in between; the generative pair mirrors it at another loss scale."""
    return {
        "u2i": 2.0 * math.exp(-0.04 * step),
        "q2i": 2.0 * math.exp(-0.005 * step),
        "i2i": 2.0 * math.exp(-0.02 * step),
        "query_rewriting": 5.0 * math.exp(-0.04 * step),
        "product_matching": 5.0 * math.exp(-0.01 * step),
    }


def emb_curves(step: int) -> dict[str, float]:
    return {t: v for t, v in curves(step).items() if t in EMB}


def run(sched: S2Sched, steps: range, losses=curves) -> dict[str, float]:
    weights: dict[str, float] = {}
    for step in steps:
        weights = sched.update(step, {t: v for t, v in losses(step).items() if t in sched.tasks})
    return weights


def group_sums(w: dict[str, float]) -> tuple[float, float]:
    return sum(w[t] for t in EMB), sum(w[t] for t in GEN)


def test_warmup_is_uniform_and_ignores_rows() -> None:
    sched = S2Sched(EMB + GEN, {**EQUAL_ROWS, "u2i": 1000}, CFG)
    for step in range(CFG.warmup):
        w = sched.update(step, curves(step))
        assert all(w[t] == pytest.approx(1 / 3) for t in EMB)
        assert all(w[t] == pytest.approx(1 / 2) for t in GEN)


def test_slower_converging_task_gains_weight() -> None:
    # Over 30 steps no curve has flattened yet, so "slower" means a flatter normalised slope throughout.
    # (Run much longer and u2i goes flat too; RCS then rightly hands its weight back.)
    sched = S2Sched(EMB + GEN, EQUAL_ROWS, CFG)
    for step in range(30):
        w = sched.update(step, curves(step))
        if step >= CFG.warmup:
            assert w["q2i"] > w["i2i"] > w["u2i"]
            assert w["product_matching"] > w["query_rewriting"]
            assert group_sums(w) == pytest.approx((1.0, 1.0))
    assert w["q2i"] > 0.5


def test_data_size_prior() -> None:
    equal = lambda step: dict.fromkeys(EMB, 1.0 / (1 + 0.1 * step))  # noqa: E731
    w = run(S2Sched(EMB, {"u2i": 300, "q2i": 100, "i2i": 100}, CFG), range(20), equal)
    # Identical curves make RCS and ACS uniform, so the prior alone decides: 3:1:1.
    assert [w[t] for t in EMB] == pytest.approx([0.6, 0.2, 0.2])


def test_without_the_size_prior_rows_do_not_count() -> None:
    # The prior can decide most of the mix (docs/evaluation.md, S2Sched vs uniform): switched off, the convergence
    # scores alone set the weights, as if every task had the same rows.
    cfg = CFG.model_copy(update={"size_prior": False})
    w = run(S2Sched(EMB + GEN, {**EQUAL_ROWS, "u2i": 3000, "product_matching": 2}, cfg), range(30))
    assert w == pytest.approx(run(S2Sched(EMB + GEN, EQUAL_ROWS, CFG), range(30)))
    assert load_config(SchedulerConfig, None, ["size_prior=false"]).size_prior is False


def test_floor_lifts_starved_task() -> None:
    equal = lambda step: dict.fromkeys(EMB, 1.0 / (1 + 0.1 * step))  # noqa: E731
    for floor_scale in (5.0, 10.0):
        cfg = CFG.model_copy(update={"floor_scale": floor_scale})
        w = run(S2Sched(EMB, {"u2i": 1, "q2i": 1000, "i2i": 1000}, cfg), range(20), equal)
        floor = 1 / (floor_scale * 3)
        assert min(w.values()) >= floor - 1e-12
        assert w["u2i"] < w["q2i"]
        assert sum(w.values()) == pytest.approx(1.0)


def test_single_task_group_and_missing_reports() -> None:
    sched = S2Sched(EMB + ("user_profile",), dict.fromkeys(EMB + ("user_profile",), 10), CFG)
    for step in range(30):
        losses = curves(step)
        # i2i reports every third step only; user_profile never reports (counts as flat).
        reported = {t: losses[t] for t in ("u2i", "q2i")} | ({"i2i": losses["i2i"]} if step % 3 == 0 else {})
        w = sched.update(step, reported)
    assert w["user_profile"] == 1.0
    assert all(math.isfinite(v) and v > 0 for v in w.values())
    assert sum(w[t] for t in EMB) == pytest.approx(1.0)


def test_static_modes() -> None:
    rows = {"u2i": 300, "q2i": 100, "i2i": 100, "query_rewriting": 1, "product_matching": 3}
    uniform = run(S2Sched(EMB + GEN, rows, SchedulerConfig(mode=ScheduleMode.UNIFORM, warmup=0)), range(20))
    assert uniform == pytest.approx({**dict.fromkeys(EMB, 1 / 3), **dict.fromkeys(GEN, 1 / 2)})
    sized = run(S2Sched(EMB + GEN, rows, SchedulerConfig(mode="size_proportional", warmup=0)), range(20))
    expected = {"u2i": 0.6, "q2i": 0.2, "i2i": 0.2, "query_rewriting": 0.25, "product_matching": 0.75}
    assert sized == pytest.approx(expected)


def test_update_interval() -> None:
    sched = S2Sched(EMB, EQUAL_ROWS, CFG.model_copy(update={"update_interval": 4}))
    run(sched, range(20))
    assert [h["step"] for h in sched.weights_history] == [0, 4, 8, 12, 16]
    assert sched.version == 16 and sched.step == 19


def test_state_dict_round_trip_continues_identically() -> None:
    whole = S2Sched(EMB + GEN, EQUAL_ROWS, CFG)
    expected = run(whole, range(50))
    first = S2Sched(EMB + GEN, EQUAL_ROWS, CFG)
    run(first, range(25))
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = S2Sched(EMB + GEN, EQUAL_ROWS, CFG)
    resumed.load_state_dict(saved)
    assert run(resumed, range(25, 50)) == expected
    assert resumed.state_dict() == whole.state_dict()


def test_config_from_overrides() -> None:
    cfg = load_config(SchedulerConfig, overrides=["mode=uniform", "source=valid", "floor_scale=10"])
    assert (cfg.mode, cfg.source, cfg.floor_scale) == (ScheduleMode.UNIFORM, LossSource.VALID, 10.0)
    with pytest.raises(ConfigError, match="history"):
        load_config(SchedulerConfig, overrides=["history=1"])


def test_bad_inputs_are_named() -> None:
    sched = S2Sched(EMB, EQUAL_ROWS, CFG)
    with pytest.raises(ValueError, match=r"step 3: loss of task 'q2i' is not finite"):
        sched.update(3, {"u2i": 1.0, "q2i": float("nan")})
    sched.update(3, {"u2i": 1.0})
    with pytest.raises(ValueError, match="steps must increase"):
        sched.update(3, {"u2i": 1.0})
    with pytest.raises(ValueError, match="unknown task 'user_profile'"):
        sched.update(4, {"user_profile": 1.0})
    with pytest.raises(ValueError, match="positive row count"):
        S2Sched(EMB, {"u2i": 1, "q2i": 1}, CFG)
    with pytest.raises(ValidationError):
        SchedulerConfig(mode="round_robin")
    with pytest.raises(ValueError, match="tasks"):
        S2Sched(EMB, EQUAL_ROWS, CFG).load_state_dict(S2Sched(GEN, EQUAL_ROWS, CFG).state_dict())


def test_allocate_largest_remainder_and_ties() -> None:
    # Quotas 3.33 / 3.33 / 3.33: the one leftover unit goes to the first-listed task, every time.
    assert allocate({"a": 1, "b": 1, "c": 1}, 10) == {"a": 4, "b": 3, "c": 3}
    assert allocate({"c": 1, "b": 1, "a": 1}, 10) == {"c": 4, "b": 3, "a": 3}
    # Quotas 5.5 / 3.3 / 1.2: floors 5+3+1, leftover to the largest fraction (a).
    assert allocate({"a": 0.55, "b": 0.33, "c": 0.12}, 10) == {"a": 6, "b": 3, "c": 1}
    assert allocate({"a": 0.5, "b": 0.5}, 0) == {"a": 0, "b": 0}


def test_allocate_caps_and_redistributes() -> None:
    weights = {"a": 0.6, "b": 0.3, "c": 0.1}
    # a wants 60 but has 10: its 50 missing go to b and c 3:1 (90 left over b, c -> 67.5 / 22.5).
    got = allocate(weights, 100, {"a": 10, "b": 1000, "c": 1000})
    assert got == {"a": 10, "b": 68, "c": 22}
    # The cascade: b is capped too once a's shortfall arrives.
    assert allocate(weights, 100, {"a": 10, "b": 40, "c": 1000}) == {"a": 10, "b": 40, "c": 50}
    # Not enough in total: everything available, no more.
    assert allocate(weights, 100, {"a": 5, "b": 5, "c": 5}) == {"a": 5, "b": 5, "c": 5}
    # A zero-weight task still fills a gap nobody else can.
    assert allocate({"a": 1.0, "b": 0.0}, 10, {"a": 4, "b": 100}) == {"a": 4, "b": 6}
    with pytest.raises(ValueError, match="'b'"):
        allocate({"a": 1.0, "b": -1.0}, 10)


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():  # another module's cluster: borrow it, leave it running
        yield
        return
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def wait_for_restart(actor, timeout_s: float = 60.0) -> None:
    """The kill is asynchronous: calls may still reach the old process, then fail while Ray restarts it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.weights.remote())
        except SchedulerLostState:
            return
        except ray.exceptions.RayActorError:
            pass
        time.sleep(0.1)
    raise TimeoutError("scheduler actor did not come back")


@pytest.mark.slow  # starts a local Ray: not in `make test-fast` (the rest of this module is plain unit tests)
def test_actor_restart_requires_state_and_continues(local_ray) -> None:
    expected = run(S2Sched(EMB, EQUAL_ROWS, CFG), range(20))
    actor = get_or_create_scheduler("s2sched", "test-s2sched", EMB, EQUAL_ROWS, CFG)
    assert get_or_create_scheduler("s2sched", "test-s2sched", EMB, EQUAL_ROWS, CFG) == actor
    for step in range(12):
        version, _ = ray.get(actor.update.remote(step, emb_curves(step)))
    assert version == 11
    saved = ray.get(actor.state_dict.remote())

    ray.kill(actor, no_restart=False)
    wait_for_restart(actor)
    ray.get(actor.load_state_dict.remote(saved))
    assert ray.get(actor.weights.remote())[0] == 11
    for step in range(12, 20):
        version, weights = ray.get(actor.update.remote(step, emb_curves(step)))
    assert (version, weights) == (19, expected)

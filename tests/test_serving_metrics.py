"""The Model replica's recfound metrics, recorded without a Ray cluster: the replica class runs in-process on the fake
engine of test_serve_engine, its metric classes swapped for a recorder that refuses what Ray's refuse."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_serve_engine import make_artifact, make_dataset, publish_fake

from recfound.data.templates import TEMPLATE_VERSION
from recfound.serving.index import text_meta
from recfound.serving.inference import Finished, Started
from recfound.serving.metrics import ServingMetrics
from recfound.serving.model import ModelReplica
from recfound.serving.rank import rank_question
from recfound.serving.schemas import RankRequest, RecommendRequest, Scorer
from recfound.tasks import ALL_TASKS

Points = dict[str, list[tuple[float, dict[str, str]]]]
pytestmark = pytest.mark.usefixtures("replica_context")


class _Recorded:
    """Stands in for Ray Serve's Counter, Histogram and Gauge: keeps every point, and refuses what Ray refuses (a tag
    key missing or unknown, a value not an int or float, a counter increment that is not positive)."""

    def __init__(
        self,
        points: Points,
        counter: bool,
        name: str,
        description: str = "",
        boundaries: list[float] | None = None,
        tag_keys: tuple[str, ...] = (),
    ) -> None:
        self.points, self.counter, self.name, self.tag_keys = points, counter, name, tag_keys

    def _record(self, value: float, tags: dict[str, str]) -> None:
        assert type(value) in (int, float), f"{self.name}: {type(value)} is not an int or float"
        assert set(tags) == set(self.tag_keys), f"{self.name}: tags {tags}, keys {self.tag_keys}"
        assert not self.counter or value > 0, f"{self.name}: Ray refuses a counter increment of {value}"
        self.points.setdefault(self.name, []).append((value, tags))

    inc = observe = set = _record


def _recording() -> tuple[ServingMetrics, Points]:
    points: Points = {}
    metrics = ServingMetrics(
        counter=partial(_Recorded, points, True),
        histogram=partial(_Recorded, points, False),
        gauge=partial(_Recorded, points, False),
    )
    return metrics, points


@pytest.fixture
def registry(tmp_path: Path) -> str:
    """A registry holding v1 of the fake engine (dim 64), and v2 (dim 32) to swap to."""
    registry, data = str(tmp_path / "registry"), make_dataset(tmp_path / "data")
    publish_fake(make_artifact(tmp_path / "m1"), data, registry)
    publish_fake(make_artifact(tmp_path / "m2", dim=32), data, registry)
    return registry


def _run(
    loop: asyncio.Runner, registry: str, calls: Callable[[Any], Awaitable[Any]], **user_config: Any
) -> tuple[Any, Points]:
    """A recording replica serving v1 (``user_config`` on top), then ``calls(replica)``."""
    replica = ModelReplica(registry, {})
    replica._metrics, points = _recording()

    async def main() -> Any:
        await replica.reconfigure({"version": "v1", **user_config})
        return await calls(replica)

    return loop.run(main()), points


def _sorted(points: Points, name: str) -> list[tuple[float, dict[str, str]]]:
    """A series' points in a fixed order: concurrent requests record in any order."""
    return sorted(points.get(name, []), key=lambda p: (sorted(p[1].items()), p[0]))


def test_an_embeddings_batch_records_tokens_its_engine_call_and_each_wait(loop: asyncio.Runner, registry: str) -> None:
    """Two requests of 2 texts and 1 text make one Serve batch and one engine call of 3 texts; each request's
    tokens and wait are its own; the engine call's tokens are what it encodes: each text with its instruction."""

    def pair(replica: ModelReplica) -> Coroutine[Any, Any, Any]:
        return asyncio.gather(
            replica.embed("q2i", ["red running shoes", "coffee mug"]), replica.embed("q2i", ["espresso"])
        )

    out, points = _run(loop, registry, pair, max_batch_size=2, batch_wait_timeout_s=30.0)
    assert [o.vectors.shape for o in out] == [(2, 64), (1, 64)]
    embed = {"call": "embed", "task": "q2i"}
    assert _sorted(points, "recfound_prompt_tokens") == [(1, embed), (5, embed)]
    assert "recfound_completion_tokens" not in points
    assert _sorted(points, "recfound_engine_batch_inputs") == [(3.0, {"kind": "embed"})]
    instruction = len(text_meta({"template_version": TEMPLATE_VERSION})["instructions"]["q2i"]["query"].split())
    assert _sorted(points, "recfound_engine_batch_tokens") == [(6.0 + 3 * instruction, {"kind": "embed"})]  # encoded
    waits = _sorted(points, "recfound_queue_wait_seconds")
    assert len(waits) == 2 and all(0 <= w < 30 and tags == {"kind": "embed"} for w, tags in waits)
    assert points["recfound_model_version"] == [(1.0, {"version": "v1"})]


def test_a_lone_request_records_the_batch_fill_it_waited_out(loop: asyncio.Runner, registry: str) -> None:
    async def lone(replica: ModelReplica) -> Any:
        return await replica.embed("u2i", ["red wool socks"])

    _, points = _run(loop, registry, lone, max_batch_size=4, batch_wait_timeout_s=0.3)
    [(wait, tags)] = points["recfound_queue_wait_seconds"]
    assert 0.3 <= wait < 10 and tags == {"kind": "embed"}


def test_a_completion_records_prompt_and_completion_tokens(loop: asyncio.Runner, registry: str) -> None:
    """As the API's usage counts them: 'hello there world' + 'ab' are 4 prompt tokens; the fake echoes 5 and 4."""

    async def complete(replica: ModelReplica) -> Any:
        return await replica.generate("answer_generation", ["hello there world", "ab"], 5, 0.0)

    out, points = _run(loop, registry, complete)
    generate = {"call": "generate", "task": "answer_generation"}
    assert out.prompt_tokens == 4 and out.completion_tokens == [5, 4]
    assert points["recfound_prompt_tokens"] == [(4, generate)]
    assert points["recfound_completion_tokens"] == [(9, generate)]
    assert points["recfound_engine_batch_inputs"] == [(2.0, {"kind": "generate"})]
    assert points["recfound_engine_batch_tokens"] == [(4.0, {"kind": "generate"})]
    assert [tags for _, tags in points["recfound_queue_wait_seconds"]] == [{"kind": "generate"}]


def test_streams_count_what_they_decode_even_when_closed_early(loop: asyncio.Runner, registry: str) -> None:
    async def streams(replica: ModelReplica) -> list[Any]:
        whole = [item async for item in replica.stream("answer_generation", "one two", 3, 0.0)]
        early = replica.stream("item_profile", "a b c d e f g h", 12, 0.0)
        await anext(early), await anext(early)
        await early.aclose()
        await asyncio.gather(*replica._decoding)
        return whole

    whole, points = _run(loop, registry, streams)
    assert whole[0] == Started("v1", 2) and whole[-1] == Finished(3)
    answer, profile = {"call": "stream", "task": "answer_generation"}, {"call": "stream", "task": "item_profile"}
    assert _sorted(points, "recfound_prompt_tokens") == [(2, answer), (8, profile)]
    [(answered, _), (decoded, _)] = _sorted(points, "recfound_completion_tokens")
    assert answered == 3 and 1 <= decoded <= 12


def test_choices_recommendations_and_rankings_count_their_tokens(loop: asyncio.Runner, registry: str) -> None:
    async def calls(replica: ModelReplica) -> Any:
        await replica.choose("sentiment_analysis", ["I love these red shoes"], ["positive", "red running shoes"])
        await replica.recommend(RecommendRequest(task="q2i", query="red shoes", k=2))
        await replica.rank(RankRequest(task="q2i", query="coffee", candidates=["i4", "i5"]))
        return await replica.rank(
            RankRequest(task="q2i", query="coffee", candidates=["i4", "i5"], scorer=Scorer.GENERATIVE)
        )

    ranked, points = _run(loop, registry, calls)
    assert {item.item_id for item in ranked.items} == {"i4", "i5"}
    choose, recommend, rank = (
        {"call": c, "task": t} for c, t in [("choose", "sentiment_analysis"), ("recommend", "q2i"), ("rank", "q2i")]
    )
    [ranker_prompt] = rank_question("q2i", "coffee", ["espresso coffee beans", "ceramic coffee mug"], ALL_TASKS).prompts
    assert _sorted(points, "recfound_prompt_tokens") == [
        (5, choose),
        (1, rank),
        (len(ranker_prompt.split()), rank),
        (2, recommend),
    ]
    assert points["recfound_completion_tokens"] == [(3, choose)]


def test_a_hot_swap_moves_the_version_series(loop: asyncio.Runner, registry: str) -> None:
    async def swap(replica: ModelReplica) -> Any:
        await replica.reconfigure({"version": "v2"})
        await replica._loading
        return await replica.embed("q2i", ["red running shoes"])

    out, points = _run(loop, registry, swap)
    assert out.version == "v2"
    assert points["recfound_model_version"] == [
        (1.0, {"version": "v1"}),
        (0.0, {"version": "v1"}),
        (1.0, {"version": "v2"}),
    ]


def test_ray_metric_classes_accept_every_point_the_replica_records() -> None:
    """Ray's own classes, no cluster needed to record: zero token counts are skipped (Ray refuses a zero increment)
    and numpy counts are converted (Ray refuses non-Python numbers)."""
    metrics = ServingMetrics()
    metrics.tokens("generate", "answer_generation", np.int64(4), np.int64(0))
    metrics.tokens("embed", "q2i", 0)
    metrics.engine_call("embed", np.int64(3), np.int64(6), [0.0, 1.0])
    metrics.serving("v2", "v1")

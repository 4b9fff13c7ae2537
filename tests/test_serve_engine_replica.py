"""The Model deployment's replica class run in process, without Serve, on stand-in engines: its health check, a
closed stream stopping its decoding, a streamed text cut where the whole one is, embeddings served beside a
generation, and the version a replica pins when the app is deployed.

(Named to sort before test_serve_export.py, as test_serve_engine.py, where these tests were, does:
``test_latest_is_pinned_when_the_app_is_deployed`` fails when it runs after that module in one process, a known
order flake.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_serve_engine import make_artifact, make_dataset, publish_fake

from recfound.model.formats import Side
from recfound.serving.streaming import StopScanner, apply_stop
from recfound.tasks import ALL_TASKS


class _ProbeEngine:
    """Counts embeds; returns NaN vectors when told to (a broken engine that still answers)."""

    def __init__(self, broken: bool = False):
        self.calls, self.broken, self.tasks = 0, broken, ALL_TASKS

    def embed(self, task: str, texts: list[str], instruction: str, side: Side) -> np.ndarray:
        self.calls += 1
        return np.full((len(texts), 4), np.nan if self.broken else 0.5, dtype=np.float32)


def _replica(engine: _ProbeEngine | None) -> object:
    """The Model deployment's class, constructed without Serve, holding ``engine`` as its live version."""
    import asyncio

    from recfound.serving.live import LiveVersion
    from recfound.serving.model import ModelReplica

    replica = ModelReplica("memory://unused", {})
    if engine is not None:
        replica._live = LiveVersion("v1", engine, None, {"q2i": {"query": "Find the item"}}, 10)
    replica.check = lambda: asyncio.run(replica.check_health())
    return replica


def test_health_check_exercises_the_engine_and_catches_a_wedged_one() -> None:
    with pytest.raises(RuntimeError, match="no model version loaded"):
        _replica(None).check()
    healthy = _replica(_ProbeEngine())
    healthy.check()
    assert healthy._live.engine.calls == 1  # a real embed, not just "a version is loaded"
    with pytest.raises(RuntimeError, match="not a finite vector"):
        _replica(_ProbeEngine(broken=True)).check()
    busy = _replica(_ProbeEngine())
    busy._live.embed_lock.acquire()  # a request is inside the engine: busy is healthy, and the probe does not wait
    busy.check()
    assert busy._live.engine.calls == 0
    busy._live.embed_lock._since -= busy._max_engine_call_s + 1  # ... until that one call outlasts max_engine_call_s
    with pytest.raises(RuntimeError, match="wedged"):
        busy.check()
    generating = _replica(_ProbeEngine())
    generating._live.generate_lock.acquire()
    generating._live.generate_lock._since -= generating._max_engine_call_s + 1  # a wedged generation counts too
    with pytest.raises(RuntimeError, match="wedged"):
        generating.check()


class _GateEngine(_ProbeEngine):
    """Generation waits until released: a long completion in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.generating, self.release = threading.Event(), threading.Event()

    def generate(self, task: str, prompts: list[str], max_tokens: int, temperature: float) -> list[str]:
        self.generating.set()
        assert self.release.wait(30)
        return ["done"] * len(prompts)


class _EndlessStream(_ProbeEngine):
    """Streams until cancelled, recording that it was."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped = threading.Event()

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(t.split()) for t in texts]

    context_length = 1000

    def stream(
        self, task: str, prompt: str, max_tokens: int, temperature: float, cancelled: threading.Event
    ) -> Iterator[str]:
        while not cancelled.wait(0.01):
            yield " token"
        self.stopped.set()


def test_closing_a_stream_stops_its_decoding() -> None:
    """A client that goes away closes the replica's stream: decoding stops and the generation lock is free."""
    import asyncio

    from recfound.serving.inference import Started

    replica = _replica(_EndlessStream())
    engine, live = replica._live.engine, replica._live

    async def read_some_then_leave() -> list[object]:
        stream = replica.stream("item_profile", "describe", 100, 0.0)
        items = [await anext(stream), await anext(stream), await anext(stream)]
        await stream.aclose()
        return items

    items = asyncio.run(read_some_then_leave())
    assert items[0] == Started("v1", 1) and items[1:] == [" token", " token"]
    assert engine.stopped.wait(10), "decoding went on after the stream was closed"
    deadline = time.monotonic() + 10
    while live.generate_lock.held_for() is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert live.generate_lock.held_for() is None


@given(
    st.text(alphabet="ab c", max_size=40),
    st.lists(st.integers(1, 6), max_size=12),
    st.lists(st.text(alphabet="ab c", min_size=1, max_size=4), max_size=4),
)
def test_a_streamed_text_is_cut_where_the_whole_text_is(text: str, cuts: list[int], stops: list[str]) -> None:
    """However the completion is split into pieces, the stream sends exactly the non-streamed answer (found by this
    test: stops "a" and " aa" on " aa" arriving as " ", "a", "a" once sent " " where the whole text sends "")."""
    pieces, start = [], 0
    for size in cuts:
        pieces.append(text[start : start + size])
        start += size
    pieces.append(text[start:])
    scanner, sent, stopped = StopScanner(stops), [], False
    for piece in pieces:
        out, stopped = scanner.feed(piece)
        sent.append(out)
        if stopped:
            break
    if not stopped:
        rest, stopped = scanner.flush()
        sent.append(rest)
    assert ("".join(sent), stopped) == apply_stop(text, stops)


def test_embeddings_are_served_while_a_generation_runs() -> None:
    """Embeddings and generation hold separate engine locks: /v1/embeddings and /v1/recommend never queue behind a
    long completion on the same replica."""
    from recfound.serving.batching import Job, embed_grouped, generate_grouped
    from recfound.serving.live import LiveVersion
    from recfound.serving.metrics import ServingMetrics

    engine, metrics = _GateEngine(), ServingMetrics()
    live = LiveVersion("v1", engine, None, {"q2i": {"query": "Find the item"}}, 10)
    generation = threading.Thread(target=generate_grouped, args=([Job(live, "q2i", ["a long one"], 3, 512)], metrics))
    generation.start()
    assert engine.generating.wait(30)
    embedded = threading.Thread(
        target=embed_grouped, args=([Job(live, "q2i", ["a query"], 2, lengths=(4,))], metrics, 4096)
    )
    embedded.start()
    embedded.join(10)
    finished_first = not embedded.is_alive()
    engine.release.set()
    generation.join(30)
    assert finished_first, "the embedding waited for the generation to finish"
    assert engine.calls == 1


def test_latest_is_pinned_when_the_app_is_deployed(tmp_path: Path) -> None:
    """A replica that starts after a publish (autoscaling, a restart) serves the deployed version, not the new one."""
    import asyncio

    from recfound.serving.app import build_app
    from recfound.serving.model import ModelReplica

    registry, data = str(tmp_path / "registry"), make_dataset(tmp_path / "data")
    publish_fake(make_artifact(tmp_path / "m1"), data, registry)
    args = build_app({"registry": registry})._bound_deployment.init_args
    publish_fake(make_artifact(tmp_path / "m2", dim=32), data, registry)  # v2 is now the registry's latest
    replica = ModelReplica(*args)
    asyncio.run(replica.reconfigure({"version": "latest"}))
    assert replica._live.version == "v1"
    redeployed = build_app({"registry": registry})._bound_deployment.init_args
    assert redeployed[3] == "v2"  # a new deploy pins the new latest (the fourth argument, ``pinned``)

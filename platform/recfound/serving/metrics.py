"""The Model replicas' Prometheus series that Ray Serve does not export itself: tokens, engine calls, queue wait and
the served version.

Serve already counts requests, errors and latency per deployment and route, queue lengths, and for ``@serve.batch``
the requests per batch, the batch's fill wait and its run time (``ray_serve_deployment_request_counter``,
``ray_serve_deployment_processing_latency_ms``, ``ray_serve_actual_batch_size``, ``ray_serve_batch_wait_time_ms``, ...).
What only the replica knows: how many tokens it was given and produced (capacity is in tokens, not requests), how
many texts and tokens each engine call carries (a request holds up to ``limits.max_inputs`` texts, and one Serve batch
is split into an engine call per version and task), how long each request waited for its engine call (Serve's fill
wait leaves out the wait behind the previous batch and behind a streaming decode on the engine lock), and which
version each replica serves (a rollout's progress).

Ray exports these with a ``ray_`` prefix (counters also with ``_total``), tagged with the replica's deployment, replica
and application: Serve's metric classes add those tags for the replica they are built in, so ``ServingMetrics`` is
built in the replica's constructor, never at import.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from ray.serve.metrics import Counter, Gauge, Histogram

QUEUE_BUCKETS_S = [
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
]
"""From an idle replica's milliseconds to a generation queued behind long completions (request_timeout_s is 300)."""
INPUT_BUCKETS = [float(2**i) for i in range(13)]
"""1 to 4096 texts: max_batch_size 16 x max_inputs 256 in the shipped config."""
TOKEN_BUCKETS = [float(2**i) for i in range(4, 23)]
"""16 to 4M tokens: the same 4096 texts of up to 1024 tokens each."""


class CounterLike(Protocol):
    def inc(self, value: float, tags: dict[str, str]) -> None: ...


class HistogramLike(Protocol):
    def observe(self, value: float, tags: dict[str, str]) -> None: ...


class GaugeLike(Protocol):
    def set(self, value: float, tags: dict[str, str]) -> None: ...


class ServingMetrics:
    """The recfound series of one replica. The metric classes are injectable so the recording is tested without a
    Ray cluster; they are called as Ray's are (keyword arguments: description, boundaries, tag_keys)."""

    def __init__(
        self,
        counter: Callable[..., Any] = Counter,
        histogram: Callable[..., Any] = Histogram,
        gauge: Callable[..., Any] = Gauge,
    ) -> None:
        self.prompt_tokens: CounterLike = counter(
            "recfound_prompt_tokens",
            description="Input tokens of answered requests, as the API's usage.prompt_tokens counts them (an "
            "embedding's instruction excluded). call: the Model method (embed, generate, choose, stream, recommend, "
            "rank); task: the model's task.",
            tag_keys=("call", "task"),
        )
        self.completion_tokens: CounterLike = counter(
            "recfound_completion_tokens",
            description="Tokens generated: completions and guided choices as usage.completion_tokens counts them; a "
            "stream's tokens as decoded, also when its client left or a stop string cut it.",
            tag_keys=("call", "task"),
        )
        self.engine_inputs: HistogramLike = histogram(
            "recfound_engine_batch_inputs",
            description="Texts (embeddings) or prompts (generation) per batched engine call.",
            boundaries=INPUT_BUCKETS,
            tag_keys=("kind",),
        )
        self.engine_tokens: HistogramLike = histogram(
            "recfound_engine_batch_tokens",
            description="Prompt tokens per batched engine call.",
            boundaries=TOKEN_BUCKETS,
            tag_keys=("kind",),
        )
        self.queue_wait: HistogramLike = histogram(
            "recfound_queue_wait_seconds",
            description="Seconds from a request entering the batch queue to the start of its engine call: batch "
            "fill, earlier batches and the engine lock.",
            boundaries=QUEUE_BUCKETS_S,
            tag_keys=("kind",),
        )
        self.version: GaugeLike = gauge(
            "recfound_model_version",
            description="1 for the registry version this replica serves, 0 for one it served before.",
            tag_keys=("version",),
        )

    def tokens(self, call: str, task: str, prompt: int, completion: int = 0) -> None:
        """Count a request's tokens; zeros are skipped (Ray refuses a counter increment that is not positive)."""
        tags = {"call": call, "task": task}
        if prompt > 0:
            self.prompt_tokens.inc(int(prompt), tags=tags)
        if completion > 0:
            self.completion_tokens.inc(int(completion), tags=tags)

    def engine_call(self, kind: str, inputs: int, tokens: int, queued: list[float]) -> None:
        """An engine call of ``kind`` (embed, generate) starts now with the requests queued at ``queued``
        (``time.monotonic()`` stamps)."""
        tags = {"kind": kind}
        now = time.monotonic()
        self.engine_inputs.observe(float(inputs), tags=tags)
        self.engine_tokens.observe(float(tokens), tags=tags)
        for stamp in queued:
            self.queue_wait.observe(now - stamp, tags=tags)

    def serving(self, version: str, previous: str | None) -> None:
        """The replica now answers with ``version``: its series goes to 1 and the previous one's to 0, so a sum over
        replicas shows a rollout's progress."""
        if previous is not None and previous != version:
            self.version.set(0.0, tags={"version": previous})
        self.version.set(1.0, tags={"version": version})

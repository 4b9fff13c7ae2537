"""How a Serve batch of requests becomes engine calls: grouped by (version, task), embeddings cut to a padded-token
budget (as text-embeddings-inference does), results handed back in request order."""

import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from recfound.model.formats import Side
from recfound.serving.live import LiveVersion
from recfound.serving.metrics import ServingMetrics


@dataclass(frozen=True)
class Job:
    """One request's share of a batch. ``tokens`` (its prompt tokens) and ``queued`` (when it entered the batch
    queue) are for the metrics of the engine call that serves it."""

    live: LiveVersion
    task: str
    texts: list[str]
    tokens: int
    max_tokens: int = 0
    temperature: float = 0.0
    lengths: tuple[int, ...] = ()
    """Embedding jobs: each text's tokens with its instruction (what the engine pads to)."""
    queued: float = field(default_factory=time.monotonic)


def _started(metrics: ServingMetrics, kind: str, members: list[Job]) -> None:
    inputs, tokens = sum(len(job.texts) for job in members), sum(job.tokens for job in members)
    metrics.engine_call(kind, inputs, tokens, [job.queued for job in members])


def embed_grouped(jobs: list[Job], metrics: ServingMetrics, max_tokens: int) -> list[np.ndarray]:
    """Per (version, task) in the batch, engine calls of at most ``max_tokens`` padded tokens; results back in job
    order."""
    groups: dict[tuple[int, str], list[int]] = defaultdict(list)
    for j, job in enumerate(jobs):
        groups[(id(job.live), job.task)].append(j)
    out: list[np.ndarray] = [np.empty(0)] * len(jobs)
    for members in groups.values():
        live, task = jobs[members[0]].live, jobs[members[0]].task
        texts = [t for j in members for t in jobs[j].texts]
        lengths = [n for j in members for n in jobs[j].lengths]
        vectors: list[np.ndarray] = [np.empty(0)] * len(texts)
        queued = [jobs[j].queued for j in members]
        with live.embed_lock:
            for chunk in token_chunks(lengths, max_tokens):
                metrics.engine_call("embed", len(chunk), sum(lengths[i] for i in chunk), queued)
                queued = []  # a request's wait ends at its batch's first call
                part = live.engine.embed(task, [texts[i] for i in chunk], live.instructions[task]["query"], Side.QUERY)
                for i, vector in zip(chunk, part, strict=True):
                    vectors[i] = vector
        start = 0
        for j in members:
            out[j] = np.stack(vectors[start : start + len(jobs[j].texts)])
            start += len(jobs[j].texts)
    return out


def token_chunks(lengths: list[int], budget: int) -> list[list[int]]:
    """Indexes of ``lengths`` in calls whose padded size (count x longest) stays within ``budget``, shortest first
    so that similar lengths share a call; a text over the budget alone is a call of its own."""
    chunks: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if chunks and (len(chunks[-1]) + 1) * lengths[i] <= budget:  # sorted: lengths[i] is the call's longest
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def generate_grouped(jobs: list[Job], metrics: ServingMetrics) -> list[list[str]]:
    groups: dict[tuple[int, str, int, float], list[int]] = defaultdict(list)
    for j, job in enumerate(jobs):
        groups[(id(job.live), job.task, job.max_tokens, job.temperature)].append(j)
    out: list[list[str]] = [[] for _ in jobs]
    for members in groups.values():
        first = jobs[members[0]]
        with first.live.generate_lock:
            _started(metrics, "generate", [jobs[j] for j in members])
            texts = first.live.engine.generate(
                first.task, [p for j in members for p in jobs[j].texts], first.max_tokens, first.temperature
            )
        start = 0
        for j in members:
            out[j] = texts[start : start + len(jobs[j].texts)]
            start += len(jobs[j].texts)
    return out

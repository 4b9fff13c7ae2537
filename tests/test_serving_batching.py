"""A Serve batch becomes engine calls: grouped by (version, task), cut to the token budget, answered in order."""

import numpy as np

from recfound.model.formats import Side
from recfound.serving.batching import Job, embed_grouped, generate_grouped, token_chunks
from recfound.serving.live import LiveVersion
from recfound.serving.metrics import ServingMetrics


class FakeEngine:
    """Records every embed / generate call and whether the matching lock of its LiveVersion was held during it."""

    def __init__(self, name: str) -> None:
        self.name, self.calls, self.live = name, [], None

    def embed(self, task: str, texts: list[str], instruction: str, side: Side) -> np.ndarray:
        self.calls.append(("embed", task, list(texts), instruction, side, self.live.embed_lock.held_for() is not None))
        return np.array([[float(ord(t[0])), float(len(t))] for t in texts])

    def generate(self, task: str, prompts: list[str], max_tokens: int, temperature: float) -> list[str]:
        held = self.live.generate_lock.held_for() is not None
        self.calls.append(("generate", task, list(prompts), max_tokens, temperature, held))
        return [f"{self.name}:{task}:{p}:{max_tokens}" for p in prompts]


def _loaded(version: str) -> LiveVersion:
    engine = FakeEngine(version)
    live = LiveVersion(version, engine, None, {t: {"query": f"{t} instruction"} for t in ("q2i", "u2i")}, 10)
    engine.live = live
    return live


def testembed_grouped_makes_one_call_per_version_and_task_and_answers_in_request_order() -> None:
    """Requests of v1/q2i (twice), v1/u2i and v2/q2i: three engine calls (under the embed lock, with the task's
    query instruction), and each request gets exactly its own rows back, in request order."""
    v1, v2 = _loaded("v1"), _loaded("v2")
    jobs = [
        Job(v1, "q2i", ["apple", "bat"], 2, lengths=(5, 3)),
        Job(v2, "q2i", ["cat"], 1, lengths=(3,)),
        Job(v1, "u2i", ["dog"], 1, lengths=(3,)),
        Job(v1, "q2i", ["eel"], 1, lengths=(3,)),
    ]
    out = embed_grouped(jobs, ServingMetrics(), max_tokens=1000)
    assert v1.engine.calls == [
        ("embed", "q2i", ["bat", "eel", "apple"], "q2i instruction", Side.QUERY, True),
        ("embed", "u2i", ["dog"], "u2i instruction", Side.QUERY, True),
    ]
    assert v2.engine.calls == [("embed", "q2i", ["cat"], "q2i instruction", Side.QUERY, True)]
    for job, vectors in zip(jobs, out):
        assert vectors.tolist() == [[float(ord(t[0])), float(len(t))] for t in job.texts]
    assert v1.busiest() is None and v2.busiest() is None  # locks released


def testembed_grouped_cuts_a_batch_into_calls_within_the_token_budget() -> None:
    """Texts of 3, 5, 9 and 30 tokens under a budget of 12 padded tokens: shortest first, each call's count x
    longest within the budget ([3] alone would also fit with 5: 2 x 5 = 10), the 30-token text alone; every
    request still gets its own vectors in order."""
    v1 = _loaded("v1")
    jobs = [
        Job(v1, "q2i", ["nine", "thirty"], 39, lengths=(9, 30)),
        Job(v1, "q2i", ["five", "three"], 8, lengths=(5, 3)),
    ]
    out = embed_grouped(jobs, ServingMetrics(), max_tokens=12)
    assert [call[2] for call in v1.engine.calls] == [["three", "five"], ["nine"], ["thirty"]]
    for job, vectors in zip(jobs, out):
        assert vectors.tolist() == [[float(ord(t[0])), float(len(t))] for t in job.texts]
    assert token_chunks([4] * 10, 16) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and token_chunks([], 8) == []


def testgenerate_grouped_splits_by_version_task_and_sampling_and_answers_in_request_order() -> None:
    """One generate call per (version, task, max_tokens, temperature), under the generation lock; each request
    gets its own completions in its prompts' order."""
    v1, v2 = _loaded("v1"), _loaded("v2")
    jobs = [
        Job(v1, "q2i", ["p1", "p2"], 2, 8, 0.0),
        Job(v1, "q2i", ["p3"], 1, 16, 0.0),
        Job(v2, "q2i", ["p4"], 1, 8, 0.0),
        Job(v1, "q2i", ["p5"], 1, 8, 0.0),
        Job(v1, "q2i", ["p6"], 1, 8, 0.7),
    ]
    out = generate_grouped(jobs, ServingMetrics())
    assert v1.engine.calls == [
        ("generate", "q2i", ["p1", "p2", "p5"], 8, 0.0, True),
        ("generate", "q2i", ["p3"], 16, 0.0, True),
        ("generate", "q2i", ["p6"], 8, 0.7, True),
    ]
    assert v2.engine.calls == [("generate", "q2i", ["p4"], 8, 0.0, True)]
    assert out == [[f"{j.live.version}:{j.task}:{p}:{j.max_tokens}" for p in j.texts] for j in jobs]
    assert v1.busiest() is None

"""The engine work of a Model replica on its live version: token counting and context checks, ``@serve.batch``ed
embedding and generation calls, token streams, guided choices, item search and ranking.

``Inference`` is the Model deployment's base (serving/model.py adds version swaps and the HTTP routes). Each call
reads the live version once, when it starts, so a swap mid-request never mixes two versions; its batch queues and
metrics outlive swaps (a batch may hold requests of two versions, which ``batching`` groups apart).
"""

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from recfound.serving.batching import Job, embed_grouped, generate_grouped
from recfound.serving.errors import ApiError, ErrorType
from recfound.serving.index import ItemIndex, user_text
from recfound.serving.live import LiveVersion
from recfound.serving.metrics import ServingMetrics
from recfound.serving.rank import rank_question
from recfound.serving.responses import RecommendedItem, RecommendResponse
from recfound.serving.schemas import MODEL_PREFIX, QUERY_PARAM, RankRequest, RecommendRequest, Scorer


@dataclass(frozen=True)
class Embedded:
    version: str
    vectors: np.ndarray
    tokens: int


@dataclass(frozen=True)
class Generated:
    version: str
    texts: list[str]
    prompt_tokens: int
    completion_tokens: list[int]


@dataclass(frozen=True)
class Started:
    """A stream's first item: the version decoding it and the prompt's token count."""

    version: str
    prompt_tokens: int


@dataclass(frozen=True)
class Finished:
    """A stream's last item."""

    completion_tokens: int


_END = object()


def _context_error(param: str, index: int, tokens: int, limit: int, what: str) -> ApiError:
    return ApiError(
        400,
        f"{param}[{index}] needs {tokens} tokens ({what}), more than the model's context of {limit} tokens",
        param,
        "context_length_exceeded",
    )


class Inference:
    """The live version and the engine calls on it."""

    def __init__(self, max_batch_tokens: int) -> None:
        self._live: LiveVersion | None = None
        self._max_batch_tokens = max_batch_tokens
        self._decoding: set[asyncio.Task[int]] = set()
        self._metrics = ServingMetrics()  # here, in the replica: Serve tags the series with its deployment and replica

    def _batching(self, max_batch_size: int, batch_wait_timeout_s: float, max_batch_tokens: int) -> None:
        """The batching knobs of the Model's ``user_config``, applied to the running queues."""
        for batcher in (self._embed_batch, self._generate_batch):
            batcher.set_max_batch_size(max_batch_size)
            batcher.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._max_batch_tokens = max_batch_tokens

    def _require_live(self) -> LiveVersion:
        if self._live is None:
            raise ApiError(503, "no model version loaded yet", None, "not_ready", ErrorType.UNAVAILABLE)
        return self._live

    async def _check_embed_context(
        self, live: LiveVersion, task: str, texts: list[str], param: str
    ) -> tuple[int, list[int]]:
        """(the instruction's tokens, each text's), once every text fits the context with the instruction."""
        instruction, *counts = await _count_tokens(live, [live.instructions[task]["query"], *texts])
        for i, n in enumerate(counts):
            if instruction + n > live.engine.context_length:
                raise _context_error(param, i, instruction + n, live.engine.context_length, "instruction included")
        return instruction, counts

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _embed_batch(self, jobs: list[Job]) -> list[np.ndarray]:
        return await asyncio.to_thread(embed_grouped, jobs, self._metrics, self._max_batch_tokens)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _generate_batch(self, jobs: list[Job]) -> list[list[str]]:
        return await asyncio.to_thread(generate_grouped, jobs, self._metrics)

    async def embed(self, task: str, texts: list[str]) -> Embedded:
        live = self._require_live()
        _served(live, task)
        instruction, counts = await self._check_embed_context(live, task, texts, "input")
        tokens = sum(counts)
        lengths = tuple(instruction + n for n in counts)
        vectors = await self._embed_batch(Job(live, task, texts, tokens, lengths=lengths))
        self._metrics.tokens("embed", task, tokens)
        return Embedded(live.version, vectors, tokens)

    async def generate(self, task: str, prompts: list[str], max_tokens: int, temperature: float) -> Generated:
        live = self._require_live()
        _served(live, task)
        counts = await _count_tokens(live, prompts)
        for i, n in enumerate(counts):
            if n + max_tokens > live.engine.context_length:
                raise _context_error(
                    "prompt",
                    i,
                    n + max_tokens,
                    live.engine.context_length,
                    f"{n} in the prompt + {max_tokens} max_tokens",
                )
        texts = await self._generate_batch(Job(live, task, prompts, sum(counts), max_tokens, temperature))
        completion = await _count_tokens(live, texts)
        self._metrics.tokens("generate", task, sum(counts), sum(completion))
        return Generated(live.version, texts, sum(counts), completion)

    async def stream(self, task: str, prompt: str, max_tokens: int, temperature: float) -> AsyncIterator[Any]:
        """One completion as it is decoded: ``Started``, then text pieces, then ``Finished``.

        Decodes on a worker thread under the generation lock (one decoding at a time, beside the batched calls),
        handing pieces to the event loop as they come. When the caller goes away (the client disconnected, a stop
        string was reached) this generator is closed and the decoding stops at its next token.
        """
        live = self._require_live()
        _served(live, task)
        [n] = await _count_tokens(live, [prompt])
        if n + max_tokens > live.engine.context_length:
            raise _context_error(
                "prompt", 0, n + max_tokens, live.engine.context_length, f"{n} in the prompt + {max_tokens} max_tokens"
            )
        self._metrics.tokens("stream", task, n)
        yield Started(live.version, n)
        loop, queue, cancelled = asyncio.get_running_loop(), asyncio.Queue[Any](), threading.Event()

        def decode() -> int:
            """Decodes, handing pieces over, and returns the decoded text's token count, also counted here for a
            stream closed early (its consumer is gone by then)."""
            pieces: list[str] = []
            try:
                with live.generate_lock:
                    for piece in live.engine.stream(task, prompt, max_tokens, temperature, cancelled):
                        pieces.append(piece)
                        loop.call_soon_threadsafe(queue.put_nowait, piece)
                loop.call_soon_threadsafe(queue.put_nowait, _END)
            except BaseException as err:
                loop.call_soon_threadsafe(queue.put_nowait, err)
            [tokens] = live.engine.count_tokens(["".join(pieces)])
            self._metrics.tokens("stream", task, 0, tokens)
            return tokens

        decoding = asyncio.create_task(asyncio.to_thread(decode))
        self._decoding.add(decoding)  # the loop holds tasks weakly; a closed stream's decoding still finishes
        decoding.add_done_callback(self._decoding.discard)
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()
        yield Finished(await decoding)

    async def _choice_scores(
        self, live: LiveVersion, task: str, prompts: list[str], choices: list[str], param: str, choice_param: str
    ) -> tuple[np.ndarray, int]:
        """(prompts, choices) scores and the prompts' token count; every (prompt, choice) pair must fit the context
        like a completion."""
        counts = await _count_tokens(live, prompts)
        longest = max(await _count_tokens(live, choices))
        for i, n in enumerate(counts):
            if n + longest > live.engine.context_length:
                raise _context_error(
                    param,
                    i,
                    n + longest,
                    live.engine.context_length,
                    f"{n} in the prompt + {longest} in the longest {choice_param}",
                )

        def score() -> np.ndarray:
            with live.generate_lock:
                return live.engine.choice_scores(task, prompts, choices)

        return await asyncio.to_thread(score), sum(counts)

    async def choose(self, task: str, prompts: list[str], choices: list[str]) -> Generated:
        """``guided_choice``: each prompt's most likely choice (the first on a tie)."""
        live = self._require_live()
        _served(live, task)
        scores, prompt_tokens = await self._choice_scores(live, task, prompts, choices, "prompt", "guided_choice")
        texts = [choices[j] for j in scores.argmax(axis=1).tolist()]
        completion = await _count_tokens(live, texts)
        self._metrics.tokens("choose", task, prompt_tokens, sum(completion))
        return Generated(live.version, texts, prompt_tokens, completion)

    def _query_side(self, live: LiveVersion, req: RecommendRequest | RankRequest) -> tuple[str, list[int]]:
        """The query text as training rendered it, and the catalogue positions it names (history or anchor)."""
        index = live.index
        if req.task == "u2i":
            history = _positions(index, req.history or [], "history")
            return user_text([index.titles[p] for p in history], live.max_history), history
        if req.task == "i2i":
            item = _positions(index, [req.item_id or ""], "item_id")
            return index.texts[item[0]], item
        return req.query or "", []

    async def _query_vector(self, live: LiveVersion, task: str, text: str) -> tuple[np.ndarray, int]:
        """The query's embedding and its token count."""
        instruction, [tokens] = await self._check_embed_context(live, task, [text], QUERY_PARAM[task])
        return (await self._embed_batch(Job(live, task, [text], tokens, lengths=(instruction + tokens,))))[0], tokens

    async def recommend(self, req: RecommendRequest) -> RecommendResponse:
        live = self._require_live()
        _served(live, req.task, "task")
        index = live.index
        text, named = self._query_side(live, req)
        exclude = named if req.task == "i2i" or req.exclude_history else []
        vector, tokens = await self._query_vector(live, req.task, text)
        hits = await asyncio.to_thread(index.search, req.task, vector, req.k, exclude)
        self._metrics.tokens("recommend", req.task, tokens)
        items = [RecommendedItem(item_id=index.item_ids[p], title=index.titles[p], score=s) for p, s in hits]
        return RecommendResponse(task=req.task, version=live.version, items=items)

    async def rank(self, req: RankRequest) -> RecommendResponse:
        """Every candidate once, best first (ties keep the request's order)."""
        live = self._require_live()
        _served(live, req.task, "task")
        index = live.index
        text, _ = self._query_side(live, req)
        positions = _positions(index, req.candidates, "candidates")
        if req.scorer is Scorer.EMBEDDING:
            vector, tokens = await self._query_vector(live, req.task, text)
            scores = index.score(req.task, vector, positions)
        else:
            question = rank_question(req.task, text, [index.titles[p] for p in positions], live.engine.tasks)
            _served(live, question.task, "scorer")
            table, tokens = await self._choice_scores(
                live, question.task, question.prompts, question.choices, QUERY_PARAM[req.task], "candidate"
            )
            scores = question.scores(table)
        self._metrics.tokens("rank", req.task, tokens)
        order = sorted(range(len(positions)), key=lambda i: -float(scores[i]))
        items = [
            RecommendedItem(
                item_id=index.item_ids[positions[i]], title=index.titles[positions[i]], score=float(scores[i])
            )
            for i in order
        ]
        return RecommendResponse(task=req.task, version=live.version, items=items)


def _served(live: LiveVersion, task: str, param: str = "model") -> None:
    """Refuse a task the live version was not trained on (or, for an export, not exported): before this, its
    engine failed inside the call and the client got a 500. A model name is a 404, as OpenAI answers an unknown
    model; the task or scorer of /v1/recommend and /v1/rank a 400."""
    if task in live.engine.tasks:
        return
    served = ", ".join(live.engine.tasks)
    if param == "model":
        raise ApiError(
            404,
            f"model {MODEL_PREFIX + task!r} is not served by version {live.version}: it was not "
            f"trained on {task} (its tasks: {served})",
            "model",
            "model_not_found",
        )
    raise ApiError(
        400,
        f"{param}: version {live.version} was not trained on {task}, which it needs (its tasks: {served})",
        param,
        "unsupported_value",
    )


async def _count_tokens(live: LiveVersion, texts: list[str]) -> list[int]:
    """Token counts, in a worker thread: tokenising a request's texts on the event loop would stall every other
    request of the replica for as long. (Tokenizers are called with one fixed setting everywhere, no truncation or
    padding, so concurrent calls never reconfigure the shared tokenizer.)"""
    return await asyncio.to_thread(live.engine.count_tokens, texts)


def _positions(index: ItemIndex, item_ids: list[str], param: str) -> list[int]:
    unknown = [i for i in item_ids if i not in index.position]
    if unknown:
        shown = ", ".join(repr(i) for i in unknown[:5])
        raise ApiError(400, f"unknown item id(s) in {param}: {shown}", param, "unknown_item")
    return [index.position[i] for i in item_ids]

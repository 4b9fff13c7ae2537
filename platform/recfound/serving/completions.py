"""/v1/completions and /v1/chat/completions: whole completions, guided choices and token streams, cut at stop
strings, in OpenAI's response and stream shapes, from a Model replica's ``Inference``."""

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from recfound.serving.api import versioned, within_timeout
from recfound.serving.errors import ApiError, ErrorType
from recfound.serving.inference import Finished, Generated, Inference, Started
from recfound.serving.limits import Limits
from recfound.serving.responses import VERSION_HEADER, completion_id, completion_response, stream_chunk
from recfound.serving.schemas import ChatRequest, CompletionRequest, generative_task
from recfound.serving.streaming import StopScanner, apply_stop, sse

log = logging.getLogger("ray.serve")

Request = CompletionRequest | ChatRequest


async def complete(
    model: Inference, req: Request, prompts: list[str], limits: Limits, chat: bool
) -> JSONResponse | StreamingResponse:
    """The completion of each prompt, whole or (``stream``) as server-sent events."""
    task = generative_task(req.model)
    max_tokens = req.checked_max_tokens(limits)
    choices, stops = req.choices(limits), req.stops(limits)
    if req.stream and choices is None:
        return await _stream(model, req, task, prompts, max_tokens, stops, limits, chat)
    if choices is not None:  # a whole choice is the answer: neither max_tokens nor stop cut it
        out: Generated = await within_timeout(model.choose(task, prompts, choices), limits)
        texts, finish = out.texts, ["stop"] * len(out.texts)
    else:
        out = await within_timeout(model.generate(task, prompts, max_tokens, req.temperature), limits)
        texts, finish = [], []
        for text, tokens in zip(out.texts, out.completion_tokens, strict=True):
            text, stopped = apply_stop(text, stops)
            texts.append(text)
            finish.append("stop" if stopped or tokens < max_tokens else "length")
    if not req.stream:
        body = completion_response(
            req.model, out.version, texts, finish, out.prompt_tokens, sum(out.completion_tokens), chat
        )
        return versioned(body, out.version)
    cid = completion_id(chat)

    async def chosen() -> AsyncIterator[dict[str, Any]]:  # a guided choice is known whole: one piece each
        for i, text in enumerate(texts):
            if chat:
                yield stream_chunk(cid, req.model, out.version, i, None, None, chat)
            yield stream_chunk(cid, req.model, out.version, i, text, None, chat)
            yield stream_chunk(cid, req.model, out.version, i, "", finish[i], chat)

    return StreamingResponse(sse(chosen()), media_type="text/event-stream", headers={VERSION_HEADER: out.version})


async def _stream(
    model: Inference,
    req: Request,
    task: str,
    prompts: list[str],
    max_tokens: int,
    stops: list[str],
    limits: Limits,
    chat: bool,
) -> StreamingResponse:
    """Token streaming: each prompt's completion is sent as the replica decodes it, cut at a stop string.

    Every prompt's stream is opened (and its context checked) before the 200, so bad input still gets a 4xx;
    prompts decode one after another, each piece within ``request_timeout_s``. An error after the 200 ends the
    stream with an error event; a client that disconnects closes the streams, which stops their decoding.
    """
    opened: list[AsyncGenerator[Any, None]] = []
    try:
        for prompt in prompts:
            opened.append(model.stream(task, prompt, max_tokens, req.temperature))
            started: Started = await within_timeout(anext(opened[-1]), limits)
    except BaseException:
        await _close(opened)
        raise
    cid, version = completion_id(chat), started.version

    async def events() -> AsyncIterator[dict[str, Any]]:
        try:
            for i, stream in enumerate(opened):
                if chat:
                    yield stream_chunk(cid, req.model, version, i, None, None, chat)
                scanner, finish = StopScanner(stops), "stop"
                while not isinstance(item := await within_timeout(anext(stream), limits), Finished):
                    piece, stopped = scanner.feed(item)
                    if piece:
                        yield stream_chunk(cid, req.model, version, i, piece, None, chat)
                    if stopped:
                        await stream.aclose()
                        break
                else:
                    rest, cut = scanner.flush()
                    finish = "length" if item.completion_tokens >= max_tokens and not cut else "stop"
                    if rest:
                        yield stream_chunk(cid, req.model, version, i, rest, None, chat)
                yield stream_chunk(cid, req.model, version, i, "", finish, chat)
        except ApiError as err:
            yield err.body()
        except Exception as err:
            log.exception("stream failed after the 200")
            yield ApiError(500, f"internal error: {type(err).__name__}", None, None, ErrorType.SERVER).body()
        finally:
            await _close(opened)

    return StreamingResponse(sse(events()), media_type="text/event-stream", headers={VERSION_HEADER: version})


async def _close(streams: list[AsyncGenerator[Any, None]]) -> None:
    """Close the streams (a closed one is left as it is): a decoding stops at its next token."""
    for stream in streams:
        await stream.aclose()

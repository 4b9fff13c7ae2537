"""The Gateway deployment: OpenAI-compatible FastAPI ingress in front of the Model deployment.

It parses, validates and authenticates HTTP, and formats OpenAI responses and errors (a 4xx in OpenAI's error
schema for every bad input, never a 5xx for one); the Model does the batched engine work.

Auth (when a token is configured, see auth.py) is deny-by-default and decided by route template, matched relative
to the root_path as the router matches, so a Serve ``route_prefix`` or ``http_options.root_path`` cannot move a
route out of it. Only ``PUBLIC_ROUTES`` answer without the token: ``/healthz``, which tells an anonymous caller
only up/down and the version, enough for load balancers and Kubernetes probes. Everything else needs the token: the
API, unknown paths (a 401, not a 404 that would map the API), and the interactive docs and OpenAPI schema, which
describe the deployment; fetch those with the token, e.g. ``curl -H "Authorization: Bearer $TOKEN" .../openapi.json``.
"""

# No ``from __future__ import annotations``: FastAPI reads the route signatures of the ingress class at runtime.
import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from recfound.serving.auth import TokenSource, authorized, require_auth_off_network
from recfound.serving.model import Embedded, Finished, Generated, Started
from recfound.serving.schemas import (
    VERSION_HEADER,
    ApiError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    ErrorType,
    Limits,
    RankRequest,
    RecommendRequest,
    RecommendResponse,
    completion_id,
    completion_response,
    embedding_response,
    embedding_task,
    generative_task,
    model_names,
    stream_chunk,
)
from recfound.serving.streaming import StopScanner, apply_stop, sse

log = logging.getLogger("ray.serve")

GATEWAY_DEPLOYMENT = "Gateway"
HEALTHZ = "/healthz"
PUBLIC_ROUTES = (Route(HEALTHZ, endpoint=lambda _: None),)
"""The routes that answer without the token, as templates: only matched, never called (the app's own route tree is
FastAPI's and Serve's internals, rebuilt by ``serve.ingress``; a Route matches as the router does)."""


api = FastAPI(title="recfound", description="RecFound embeddings, generation and recommendation")


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@api.exception_handler(ApiError)
async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    return _error(err)


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
    """Malformed JSON and wrong types: a 400 naming the field, as OpenAI does, not FastAPI's 422."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    if first["type"] == "json_invalid":
        return _error(
            ApiError(
                400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}", None, "invalid_json"
            )
        )
    code = "missing_field" if first["type"] == "missing" else "invalid_type"
    return _error(ApiError(400, f"{where or 'body'}: {first['msg']}", where or None, code))


@api.exception_handler(HTTPException)
async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    error_type = ErrorType.NOT_FOUND if err.status_code == 404 else ErrorType.INVALID_REQUEST
    if err.status_code == 413:  # BodyLimit's, raised while the route reads a chunked body
        return _error(_too_large(request.app.state.limits.max_body_bytes))
    return _error(ApiError(err.status_code, str(err.detail), None, None, error_type))


@api.exception_handler(Exception)
async def _internal(_: Request, err: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return _error(ApiError(500, f"internal error: {type(err).__name__}", None, None, ErrorType.SERVER))


def _authorized(request: Request) -> bool:
    return authorized(request.headers.get("authorization"), request.app.state.token.current())


def _public(request: Request) -> bool:
    """Whether the request matches a public route's template, relative to the root_path (where Serve puts the
    route_prefix) as the router matches it; any other path, unknown ones included, is not public."""
    return any(route.matches(request.scope)[0] is not Match.NONE for route in PUBLIC_ROUTES)


@api.middleware("http")
async def _auth(request: Request, call_next: Any) -> Any:
    """The token on every route but the public ones, FastAPI's docs and schema routes included (a middleware sees
    those; a dependency would not)."""
    if not _public(request) and not _authorized(request):
        return _error(
            ApiError(401, "missing or invalid bearer token", None, "invalid_api_key", ErrorType.AUTHENTICATION)
        )
    return await call_next(request)


TOO_LARGE = "request_too_large"


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body over {limit} bytes (limits.max_body_bytes)", None, TOO_LARGE)


class BodyLimit:
    """``Limits.max_body_bytes`` on every request: a Content-Length over it is answered 413 before any byte is read;
    a chunked upload is cut off by Starlette's body limit as soon as the bytes read pass it (its 413 reaches
    ``_http_error`` through FastAPI's body reading), so an oversized body never reaches JSON parsing. (FastAPI's own
    ``max_body_size`` is fixed on each route when it is declared, before the Serve config is known; Starlette's
    answers a too-long Content-Length in plain text, hence the first check here.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = scope["app"].state.limits.max_body_bytes
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _error(_too_large(limit))(scope, receive, send)
            return
        await RequestBodyLimitMiddleware(self.app, max_body_size=limit)(scope, receive, send)


api.add_middleware(BodyLimit)


async def answer(
    call: DeploymentResponse | DeploymentResponseGenerator, limits: Limits, timeout_s: float | None = None
) -> Any:
    """The model replica's answer (a stream's next item) within ``timeout_s`` (default ``request_timeout_s``; 504
    past it, the request cancelled), or a 503 when the Model's queue is full (Serve's ``max_queued_requests``):
    overload answers fast instead of piling up."""
    pending = anext(call) if isinstance(call, DeploymentResponseGenerator) else call
    try:
        return await asyncio.wait_for(pending, limits.request_timeout_s if timeout_s is None else timeout_s)
    except TimeoutError:
        call.cancel()
        raise ApiError(
            504,
            f"no answer within {limits.request_timeout_s:g} s (limits.request_timeout_s)",
            None,
            "timeout",
            ErrorType.SERVER,
        ) from None
    except BackPressureError:
        raise ApiError(
            503, "the model is at capacity; retry shortly", None, "overloaded", ErrorType.UNAVAILABLE
        ) from None


MODEL_CALL_ATTEMPTS = 3
"""Sends of one whole Model call, each after the replica running the previous one died."""


async def ask(send: Callable[[], DeploymentResponse], limits: Limits) -> Any:
    """``answer`` to a whole (not streamed) Model call, sent again when the replica running it dies (killed, out
    of memory, its node lost), all within ``request_timeout_s``. Serve itself re-routes only requests a dead replica
    had not accepted yet; every Model call is a read, so sending it again to another replica is safe. (A stream is
    not sent again: part of it may have reached the client.)"""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.request_timeout_s
    for attempt in range(1, MODEL_CALL_ATTEMPTS + 1):
        try:
            return await answer(send(), limits, max(deadline - loop.time(), 0.0))
        except RayActorError as err:
            log.warning(
                "Model replica lost during a call (attempt %d of %d): %s",
                attempt,
                MODEL_CALL_ATTEMPTS,
                type(err).__name__,
            )
    raise ApiError(
        503,
        f"the model replica died {MODEL_CALL_ATTEMPTS} times running this request; retry shortly",
        None,
        "replica_lost",
        ErrorType.UNAVAILABLE,
    )


def _proxy_host() -> str:
    """The address Serve's HTTP proxies bind (there is no public API for it; the controller client has it)."""
    from ray.serve.context import _get_global_client

    return _get_global_client().http_config.host


def _versioned(body: dict[str, Any] | BaseModel, version: str) -> JSONResponse:
    payload = body if isinstance(body, dict) else body.model_dump()
    return JSONResponse(payload, headers={VERSION_HEADER: version})


@serve.deployment(name=GATEWAY_DEPLOYMENT)
@serve.ingress(api)
class Gateway:
    """HTTP in, OpenAI/recommend JSON out; every answer carries the model version (field + header)."""

    def __init__(self, model: DeploymentHandle, limits: dict[str, Any]):
        self._model = model
        self._limits = Limits.model_validate(limits)
        source = TokenSource()
        require_auth_off_network(source.token, _proxy_host())
        api.state.token, api.state.limits = source, self._limits

    @api.get(HEALTHZ)
    async def healthz(self, request: Request) -> JSONResponse:
        """Up (200) or down (503) and the version for anyone; the details (``last_error`` names local paths, the
        index size, the context length) only with the token, or when auth is off."""
        try:
            info = await ask(self._model.info.remote, self._limits)
        except ApiError as err:
            return _error(err)
        detail = info if _authorized(request) else {"version": info["version"]}
        return _versioned({"status": "ok", **detail}, info["version"])

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        info = await ask(self._model.info.remote, self._limits)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "recfound"} for name in model_names()]
        return _versioned({"object": "list", "data": data, "version": info["version"]}, info["version"])

    @api.post("/v1/embeddings")
    async def embeddings(self, req: EmbeddingRequest) -> JSONResponse:
        task = embedding_task(req.model)
        out: Embedded = await ask(partial(self._model.embed.remote, task, req.texts(self._limits)), self._limits)
        if req.dimensions is not None and req.dimensions != out.vectors.shape[1]:
            raise ApiError(
                400,
                f"dimensions={req.dimensions}; this model embeds in {out.vectors.shape[1]}",
                "dimensions",
                "unsupported_value",
            )
        return _versioned(
            embedding_response(req.model, out.version, out.vectors, out.tokens, req.encoding_format), out.version
        )

    @api.post("/v1/completions")
    async def completions(self, req: CompletionRequest) -> Any:
        return await self._complete(req, req.prompts(self._limits), chat=False)

    @api.post("/v1/chat/completions")
    async def chat(self, req: ChatRequest) -> Any:
        return await self._complete(req, [req.prompt(self._limits)], chat=True)

    async def _complete(self, req: CompletionRequest | ChatRequest, prompts: list[str], chat: bool) -> Any:
        task = generative_task(req.model)
        max_tokens = req.checked_max_tokens(self._limits)
        choices, stops = req.choices(self._limits), req.stops(self._limits)
        if req.stream and choices is None:
            return await self._stream(req, task, prompts, max_tokens, stops, chat)
        if choices is not None:  # a whole choice is the answer: neither max_tokens nor stop cut it
            out: Generated = await ask(partial(self._model.choose.remote, task, prompts, choices), self._limits)
            texts, finish = out.texts, ["stop"] * len(out.texts)
        else:
            out = await ask(
                partial(self._model.generate.remote, task, prompts, max_tokens, req.temperature), self._limits
            )
            texts, finish = [], []
            for text, tokens in zip(out.texts, out.completion_tokens, strict=True):
                text, stopped = apply_stop(text, stops)
                texts.append(text)
                finish.append("stop" if stopped or tokens < max_tokens else "length")
        if not req.stream:
            body = completion_response(
                req.model, out.version, texts, finish, out.prompt_tokens, sum(out.completion_tokens), chat
            )
            return _versioned(body, out.version)
        cid = completion_id(chat)

        async def chosen() -> AsyncIterator[dict[str, Any]]:  # a guided choice is known whole: one piece each
            for i, text in enumerate(texts):
                if chat:
                    yield stream_chunk(cid, req.model, out.version, i, None, None, chat)
                yield stream_chunk(cid, req.model, out.version, i, text, None, chat)
                yield stream_chunk(cid, req.model, out.version, i, "", finish[i], chat)

        return StreamingResponse(sse(chosen()), media_type="text/event-stream", headers={VERSION_HEADER: out.version})

    async def _stream(
        self,
        req: CompletionRequest | ChatRequest,
        task: str,
        prompts: list[str],
        max_tokens: int,
        stops: list[str],
        chat: bool,
    ) -> StreamingResponse:
        """Token streaming: each prompt's completion is sent as the replica decodes it, cut at a stop string.

        Every prompt's stream is opened (and its context checked) before the 200, so bad input still gets a 4xx;
        prompts decode one after another. An error after the 200 ends the stream with an error event; a client
        that disconnects cancels the replica's streams, which stops their decoding.
        """
        opened: list[DeploymentResponseGenerator] = []
        try:
            for prompt in prompts:
                opened.append(self._model.options(stream=True).stream.remote(task, prompt, max_tokens, req.temperature))
                started: Started = await answer(opened[-1], self._limits)
        except BaseException:
            for stream in opened:
                stream.cancel()
            raise
        cid, version = completion_id(chat), started.version

        async def events() -> AsyncIterator[dict[str, Any]]:
            try:
                for i, stream in enumerate(opened):
                    if chat:
                        yield stream_chunk(cid, req.model, version, i, None, None, chat)
                    scanner, finish = StopScanner(stops), "stop"
                    while not isinstance(item := await answer(stream, self._limits), Finished):
                        piece, stopped = scanner.feed(item)
                        if piece:
                            yield stream_chunk(cid, req.model, version, i, piece, None, chat)
                        if stopped:
                            stream.cancel()
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
                for stream in opened:
                    stream.cancel()

        return StreamingResponse(sse(events()), media_type="text/event-stream", headers={VERSION_HEADER: version})

    @api.post("/v1/recommend")
    async def recommend(self, req: RecommendRequest) -> JSONResponse:
        req.check(self._limits)
        out: RecommendResponse = await ask(partial(self._model.recommend.remote, req), self._limits)
        return _versioned(out, out.version)

    @api.post("/v1/rank")
    async def rank(self, req: RankRequest) -> JSONResponse:
        """A candidate list ordered by the model: every candidate once, best first, in /v1/recommend's shape."""
        req.check(self._limits)
        out: RecommendResponse = await ask(partial(self._model.rank.remote, req), self._limits)
        return _versioned(out, out.version)

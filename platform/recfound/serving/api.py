"""The HTTP face of the Model deployment: the FastAPI app its replicas serve (serving/model.py), with the OpenAI
error schema, auth and the body limit.

Every bad input gets a 4xx in OpenAI's error schema, never a 5xx. Auth (when a token is configured, see auth.py) is
deny-by-default and decided by route template, matched relative to the root_path as the router matches, so a Serve
``route_prefix`` or ``http_options.root_path`` cannot move a route out of it. Only ``PUBLIC_ROUTES`` answer without
the token: ``/healthz``, which tells an anonymous caller only up/down and the version, enough for load balancers and
Kubernetes probes. Everything else needs the token: the API, unknown paths (a 401, not a 404 that would map the API),
and the interactive docs and OpenAPI schema, which describe the deployment; fetch those with the token, e.g.
``curl -H "Authorization: Bearer $TOKEN" .../openapi.json``.
"""

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from recfound.serving.auth import TokenSource, authorized
from recfound.serving.errors import ApiError, ErrorType
from recfound.serving.limits import Limits, configure_limits, configured_limits
from recfound.serving.proxy import HttpMiddleware
from recfound.serving.responses import VERSION_HEADER

log = logging.getLogger("ray.serve")

HEALTHZ = "/healthz"
PUBLIC_ROUTES = (Route(HEALTHZ, endpoint=lambda _: None),)
"""The routes that answer without the token, as templates: only matched, never called (the app's own route tree is
FastAPI's and Serve's internals, rebuilt by ``serve.ingress``; a Route matches as the router does)."""


api = FastAPI(title="recfound", description="RecFound embeddings, generation and recommendation")


class _Settings:
    """The token source of the replica's app, set once by the Model replica as it starts (``configure``). Not in
    ``api.state``: Serve runs a copy of ``api`` that ``serve.ingress`` froze when the class was decorated."""

    token: TokenSource | None = None


_settings = _Settings()


def configure(limits: Limits, token: TokenSource) -> None:
    configure_limits(limits)
    _settings.token = token


def _token() -> str | None:
    """The token requests need (None: auth off); unconfigured, every request fails rather than run open."""
    if _settings.token is None:
        raise RuntimeError("the API is not configured: serve it from the Model deployment")
    return _settings.token.current()


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
async def _http_error(_: Request, err: HTTPException) -> JSONResponse:
    error_type = ErrorType.NOT_FOUND if err.status_code == 404 else ErrorType.INVALID_REQUEST
    if err.status_code == 413:  # BodyLimit's, raised while the route reads a chunked body
        return _error(_too_large(configured_limits().max_body_bytes))
    return _error(ApiError(err.status_code, str(err.detail), None, None, error_type))


@api.exception_handler(Exception)
async def _internal(_: Request, err: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return _error(ApiError(500, f"internal error: {type(err).__name__}", None, None, ErrorType.SERVER))


def has_token(request: Request) -> bool:
    return authorized(request.headers.get("authorization"), _token())


def _public(request: Request) -> bool:
    """Whether the request matches a public route's template, relative to the root_path (where Serve puts the
    route_prefix) as the router matches it; any other path, unknown ones included, is not public."""
    return any(route.matches(request.scope)[0] is not Match.NONE for route in PUBLIC_ROUTES)


@api.middleware("http")
async def _auth(request: Request, call_next: Any) -> Any:
    """The token on every route but the public ones, FastAPI's docs and schema routes included (a middleware sees
    those; a dependency would not)."""
    if not _public(request) and not has_token(request):
        return _error(
            ApiError(401, "missing or invalid bearer token", None, "invalid_api_key", ErrorType.AUTHENTICATION)
        )
    return await call_next(request)


TOO_LARGE = "request_too_large"


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body over {limit} bytes (limits.max_body_bytes)", None, TOO_LARGE)


class BodyLimit(HttpMiddleware):
    """``Limits.max_body_bytes`` on every request: a Content-Length over it is answered 413 before any byte is read;
    a chunked upload is cut off by Starlette's body limit as soon as the bytes read pass it (its 413 reaches
    ``_http_error`` through FastAPI's body reading), so an oversized body never reaches JSON parsing. (FastAPI's own
    ``max_body_size`` is fixed on each route when it is declared, before the Serve config is known; Starlette's
    answers a too-long Content-Length in plain text, hence the first check here.)"""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = configured_limits().max_body_bytes
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _error(_too_large(limit))(scope, receive, send)
            return
        await RequestBodyLimitMiddleware(self.app, max_body_size=limit)(scope, receive, send)


api.add_middleware(BodyLimit)


T = TypeVar("T")


async def within_timeout(call: Awaitable[T], limits: Limits) -> T:
    """``call``'s result, or a 504 once it has run ``request_timeout_s`` (the call is cancelled: a request waiting
    for its batch leaves the queue; engine work already started in a thread runs to its end)."""
    try:
        return await asyncio.wait_for(call, limits.request_timeout_s)
    except TimeoutError:
        raise ApiError(
            504,
            f"no answer within {limits.request_timeout_s:g} s (limits.request_timeout_s)",
            None,
            "timeout",
            ErrorType.SERVER,
        ) from None


def versioned(body: dict[str, Any] | BaseModel, version: str) -> JSONResponse:
    """Every answer names the version that made it, in the body and in a header."""
    payload = body if isinstance(body, dict) else body.model_dump()
    return JSONResponse(payload, headers={VERSION_HEADER: version})

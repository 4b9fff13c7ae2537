"""What Serve's HTTP proxy does for the one-hop app that no replica can: answer its own errors in OpenAI's schema,
and send a request again when the replica running it dies.

With the API in the Model replicas, two answers come from the proxy itself: the 503 when every replica's queue is
full (``max_queued_requests``), which Serve writes in plain text, and the error when a replica dies holding a request
(killed, out of memory, its node lost), which reaches the client as a bare 500 because Serve re-routes only the
requests a dead replica had not accepted. ``ProxyErrors`` rewrites the first into OpenAI's error schema and sends
the second again, to another replica (every route is a read), up to ``ATTEMPTS`` times, then answers 503. It holds
a whole answer until its last byte (a replica can die between an answer's start and its body); a stream is passed on
as it comes, and one half sent is never sent again.

Serve installs proxy middlewares only from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` in the environment the
proxies start in (that of ``ray start`` or ``serve run``): set it to ``PROXY_CALLBACK``.
"""

import logging
import os
from collections.abc import Awaitable, Callable

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recfound.serving.errors import ApiError, ErrorType

log = logging.getLogger("ray.serve")

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "recfound.serving.proxy:middlewares"
ATTEMPTS = 3
"""Sends of one request, each after the replica running the previous one died."""
REPLAY_MAX_BYTES = 8 * 2**20
"""The most request body kept to send again (limits.max_body_bytes' default); a longer request is not resent."""
SERVE_ERRORS = {
    408: ("timeout", ErrorType.SERVER),
    404: ("not_found", ErrorType.NOT_FOUND),
    503: ("unavailable", ErrorType.UNAVAILABLE),
}
"""OpenAI error code and type of the plain-text errors Serve's proxy answers itself (others: a server error)."""


def middlewares() -> list[Middleware]:
    """The callback ``PROXY_CALLBACK`` names: Serve calls it once in each proxy."""
    return [Middleware(ProxyErrors)]


def warn_unless_installed() -> None:
    """Log when the proxies lack ``ProxyErrors`` (read where the app is built, which shares the proxies'
    environment): overload 503s would then be plain text, and a dead replica's requests lost."""
    if os.environ.get(PROXY_CALLBACK_ENV) != PROXY_CALLBACK:
        log.warning(
            "%s is not %s in the Ray cluster's environment: overload 503s come in plain text and requests a dying "
            "replica held fail with 500; set it where `ray start` / `serve run` runs",
            PROXY_CALLBACK_ENV,
            PROXY_CALLBACK,
        )


def serve_error(status: int, text: str) -> ApiError:
    """A plain-text error of Serve's proxy in OpenAI's schema; ``overloaded`` when the replicas' queues are full."""
    if status == 503 and "backpressure" in text:
        return ApiError(
            503, f"the model is at capacity; retry shortly ({text})", None, "overloaded", ErrorType.UNAVAILABLE
        )
    code, error_type = SERVE_ERRORS.get(status, (None, ErrorType.SERVER))
    return ApiError(status, text or "Serve could not answer", None, code, error_type)


class HttpMiddleware:
    """An ASGI middleware that acts on HTTP requests only (``http``) and passes every other scope (lifespan,
    websocket) to the app untouched: the opening ``ProxyErrors`` and api.py's ``BodyLimit`` share. It lives here,
    not in api.py, because Serve's proxies import this module, and importing api.py would build the API app there."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The middleware's work on one HTTP request."""
        raise NotImplementedError


class ProxyErrors(HttpMiddleware):
    """ASGI middleware around Serve's proxy app (see the module docstring)."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = _ReplayableBody(receive)
        for attempt in range(1, ATTEMPTS + 1):
            reply = _Reply(send)
            await self.app(scope, body.receive(), reply)
            if reply.sent or body.disconnected:
                return
            log.warning(
                "no answer to %s: its replica died or failed (attempt %d of %d)", scope["path"], attempt, ATTEMPTS
            )
            if not body.replayable:
                break
        lost = ApiError(
            503, "the replica running this request died; retry shortly", None, "replica_lost", ErrorType.UNAVAILABLE
        )
        await _send_error(send, lost, {})


class _ReplayableBody:
    """The request as the proxy reads it, kept (up to ``REPLAY_MAX_BYTES``) so another attempt reads it again."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._kept: list[Message] = []
        self._size = 0
        self.replayable = True
        self.disconnected = False

    def receive(self) -> Callable[[], Awaitable[Message]]:
        """A fresh ``receive`` for one attempt: the messages kept so far, then the client's."""
        replay = iter(list(self._kept))

        async def next_message() -> Message:
            kept = next(replay, None)
            return kept if kept is not None else await self._read()

        return next_message

    async def _read(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.disconnected = True
        elif self.replayable:
            self._size += len(message.get("body", b""))
            self.replayable = self._size <= REPLAY_MAX_BYTES
            self._kept.append(message) if self.replayable else self._kept.clear()
        return message


class _Reply:
    """The proxy's ``send`` for one attempt. It holds a whole (not streamed) answer until its last byte, so one cut
    off by its replica's death is sent again rather than reaching the client truncated; passes a stream on as it
    comes; and rewrites an error Serve wrote in plain text (the replica's own errors are JSON) into OpenAI's schema.
    ``sent``: something reached the client, so the request must not be sent again."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.sent = False
        self._held: list[Message] | None = None
        self._plain: tuple[int, Headers] | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = Headers(raw=message.get("headers", []))
            content_type = headers.get("content-type", "")
            if message["status"] >= 400 and content_type.startswith("text/plain"):
                self._plain = (message["status"], headers)
            if not content_type.startswith("text/event-stream"):
                self._held = [message]
                return
        elif message["type"] == "http.response.body" and self._held is not None:
            self._held.append(message)
            if not message.get("more_body", False):
                await self._release()
            return
        self.sent = True
        await self._send(message)

    async def _release(self) -> None:
        """The held answer, whole: as it came, or Serve's plain-text error in OpenAI's schema."""
        held, self._held = self._held or [], None
        self.sent = True
        if self._plain is None:
            for message in held:
                await self._send(message)
            return
        status, headers = self._plain
        text = b"".join(m.get("body", b"") for m in held[1:]).decode(errors="replace").strip()
        retry = {"retry-after": headers["retry-after"]} if "retry-after" in headers else {}
        await _send_error(self._send, serve_error(status, text), retry)


async def _send_error(send: Send, err: ApiError, headers: dict[str, str]) -> None:
    response = JSONResponse(err.body(), status_code=err.status, headers=headers)
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})

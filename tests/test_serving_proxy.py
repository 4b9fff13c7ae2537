"""The HTTP proxy's middleware (serving/proxy.py) in process, around a stand-in for Serve's proxy app: a request
whose replica died is sent again with its whole body, up to ATTEMPTS times, then answered 503 in OpenAI's schema;
Serve's own plain-text errors come out in OpenAI's schema; nothing started or abandoned is sent again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from recfound.serving.proxy import ATTEMPTS, PROXY_CALLBACK, ProxyErrors, middlewares

SCOPE: Scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": []}
BODY = [b'{"model": "recfound-q2i", ', b'"input": "red socks"}']
BACKPRESSURE = b"Request dropped due to backpressure (num_queued_requests=1, max_queued_requests=1)."


def _client(disconnect_after_body: bool = False) -> Receive:
    """The client's side: the body in two chunks, then (like uvicorn) nothing until it disconnects."""
    messages = [{"type": "http.request", "body": chunk, "more_body": i < len(BODY) - 1} for i, chunk in enumerate(BODY)]

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        if disconnect_after_body:
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()  # the client waits for its answer
        raise AssertionError("unreachable")

    return receive


async def _read_body(receive: Receive) -> bytes:
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    return body


def _proxy(dies: int, answer: Callable[[Send, bytes], Awaitable[None]]) -> tuple[Callable[..., Any], list[bytes]]:
    """A stand-in for Serve's proxy: it reads the body, then for the first ``dies`` calls sends nothing (what Serve
    does when the replica running the request dies), then lets ``answer`` reply. Records each call's body."""
    bodies: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        bodies.append(await _read_body(receive))
        if len(bodies) > dies:
            await answer(send, bodies[-1])

    return app, bodies


async def _echo(send: Send, body: bytes) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def _plain(status: int, text: bytes, headers: list[tuple[bytes, bytes]]) -> Callable[[Send, bytes], Awaitable[None]]:
    async def answer(send: Send, _: bytes) -> None:
        start_headers = [(b"content-type", b"text/plain; charset=utf-8"), *headers]
        await send({"type": "http.response.start", "status": status, "headers": start_headers})
        await send({"type": "http.response.body", "body": text})

    return answer


def _call(app: Callable[..., Any], receive: Receive | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) the client gets through ProxyErrors."""
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(ProxyErrors(app)(SCOPE, receive or _client(), send))
    start, *rest = sent
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, b"".join(m.get("body", b"") for m in rest)


def test_serve_installs_it_from_the_documented_callback() -> None:
    module, name = PROXY_CALLBACK.split(":")
    assert module == "recfound.serving.proxy" and name == middlewares.__name__
    assert [m.cls for m in middlewares()] == [ProxyErrors]


def test_a_request_whose_replica_died_is_sent_again_with_its_whole_body() -> None:
    app, bodies = _proxy(dies=ATTEMPTS - 1, answer=_echo)
    status, _, body = _call(app)
    assert status == 200 and body == b"".join(BODY)
    assert bodies == [b"".join(BODY)] * ATTEMPTS


def test_past_its_attempts_a_lost_request_gets_an_openai_503() -> None:
    app, bodies = _proxy(dies=ATTEMPTS, answer=_echo)
    status, headers, body = _call(app)
    assert status == 503 and headers["content-type"] == "application/json" and len(bodies) == ATTEMPTS
    assert json.loads(body)["error"] == {
        "message": "the replica running this request died; retry shortly",
        "type": "service_unavailable",
        "param": None,
        "code": "replica_lost",
    }


def test_a_request_whose_client_left_is_not_sent_again() -> None:
    app, bodies = _proxy(dies=ATTEMPTS, answer=_echo)

    async def send(message: Message) -> None:
        raise AssertionError(f"nothing is sent to a client that left: {message}")

    async def main() -> None:
        receive = _client(disconnect_after_body=True)

        async def disconnects_then_dies(scope: Scope, receive: Receive, send: Send) -> None:
            await app(scope, receive, send)
            assert (await receive())["type"] == "http.disconnect"  # Serve's proxy watches for it

        await ProxyErrors(disconnects_then_dies)(SCOPE, receive, send)

    asyncio.run(main())
    assert len(bodies) == 1


def test_serve_overload_503_comes_in_openai_schema_with_its_retry_after() -> None:
    app, bodies = _proxy(dies=0, answer=_plain(503, BACKPRESSURE, [(b"retry-after", b"2")]))
    status, headers, body = _call(app)
    error = json.loads(body)["error"]
    assert status == 503 and headers["retry-after"] == "2" and len(bodies) == 1
    assert error["code"] == "overloaded" and error["type"] == "service_unavailable"
    assert "at capacity" in error["message"] and "max_queued_requests=1" in error["message"]


def test_serve_timeout_comes_in_openai_schema() -> None:
    app, _ = _proxy(dies=0, answer=_plain(408, b"Request abc timed out after 1.0s.", []))
    status, _, body = _call(app)
    assert status == 408 and json.loads(body)["error"]["code"] == "timeout"


def test_the_replica_s_own_answers_pass_unchanged() -> None:
    """A JSON error (the replica's, already OpenAI's) and a started answer are the client's as they are."""
    own = json.dumps({"error": {"message": "x", "type": "invalid_request_error", "param": None, "code": "c"}})

    async def replica_error(send: Send, _: bytes) -> None:
        await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": own.encode()})

    app, bodies = _proxy(dies=0, answer=replica_error)
    assert _call(app)[::2] == (400, own.encode()) and len(bodies) == 1


def test_a_started_answer_is_not_sent_again() -> None:
    """A stream whose replica dies half-way ends there: part of it reached the client, so a resend would repeat it."""

    async def half_a_stream(send: Send, _: bytes) -> None:
        start_headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": start_headers})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})

    app, bodies = _proxy(dies=0, answer=half_a_stream)
    assert _call(app)[::2] == (200, b"data: {}\n\n") and len(bodies) == 1


def test_an_answer_cut_off_by_its_replica_s_death_is_sent_again_whole() -> None:
    """Serve passes an answer's start before its body: a replica that dies between them must not leave the client a
    200 with no body (seen in the chaos test); the proxy holds a whole answer until its last byte."""
    calls: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        calls.append(1)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        if len(calls) > 1:
            await send({"type": "http.response.body", "body": body})

    assert _call(app)[::2] == (200, b"".join(BODY)) and len(calls) == 2

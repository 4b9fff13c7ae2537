"""What the API's and the proxy's ASGI middlewares share (proxy.HttpMiddleware): a scope that is not an HTTP request
(lifespan, websocket) reaches the app untouched, with the same receive and send, before any limit is read."""

import asyncio

import pytest
from starlette.types import Receive, Scope, Send

from recfound.serving.api import BodyLimit
from recfound.serving.proxy import HttpMiddleware, ProxyErrors


@pytest.mark.parametrize("middleware", [BodyLimit, ProxyErrors])
@pytest.mark.parametrize("kind", ["lifespan", "websocket"])
def test_a_scope_that_is_not_http_passes_through(middleware: type[HttpMiddleware], kind: str) -> None:
    seen: list[tuple[Scope, Receive, Send]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope, receive, send))

    async def receive() -> dict:
        return {}

    async def send(message: dict) -> None:
        pass

    scope = {"type": kind}
    asyncio.run(middleware(app)(scope, receive, send))  # BodyLimit unconfigured: a limit read would raise
    assert seen == [(scope, receive, send)]

"""HTTP clients of the Serve load and abuse benchmarks (bench/serve_load.py, bench/serve_abuse.py): closed-loop
aiohttp clients on one event loop, and issue 14's abusive requests.

Nothing here imports torch or Ray: the abusive clients run in a process of their own
(``python -m recfound.bench.http_load abuse ...``, driven over its stdin and stdout), so their CPU time is theirs
and they do not share an interpreter lock with the clients whose latency is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import aiohttp

JSON_HEADERS = {"content-type": "application/json"}
MIB = 2**20
CHUNK = 64 * 1024


class Outcome(str, Enum):
    """What one request got: an HTTP status class, or no answer."""

    OK = "2xx"
    REFUSED = "4xx"
    OVERLOADED = "503"
    SERVER_ERROR = "other 5xx"
    CONNECTION = "connection error"
    TIMEOUT = "timeout"


def outcome(status: int) -> Outcome:
    if status == 503:
        return Outcome.OVERLOADED
    if status >= 500:
        return Outcome.SERVER_ERROR
    return Outcome.REFUSED if status >= 400 else Outcome.OK


Body = bytes | Callable[[], AsyncIterator[bytes]]
"""A whole body (sent with its Content-Length) or a factory of a chunked upload (no Content-Length)."""


@dataclass(frozen=True)
class Call:
    route: str
    outcome: Outcome
    status: int | None
    started: float
    """Seconds since the run began."""
    latency_s: float
    code: str | None = None
    """OpenAI error code of a 4xx/5xx answer (only when asked for)."""


async def send(
    session: aiohttp.ClientSession, url: str, body: Body, route: str, t0: float, codes: bool = False
) -> Call:
    """One POST, timed from before the request is written to the last byte of the answer."""
    start = time.perf_counter()
    status, code = None, None
    try:
        data = body if isinstance(body, bytes) else body()
        async with session.post(url, data=data, headers=JSON_HEADERS) as response:
            payload = await response.read()
            status = response.status
        result = outcome(status)
        if codes and status >= 400:
            try:
                code = json.loads(payload)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = payload[:80].decode(errors="replace")
    except TimeoutError:  # aiohttp's timeouts are TimeoutErrors (and some also ClientErrors): check them first
        result = Outcome.TIMEOUT
    except aiohttp.ClientError as err:
        result, code = Outcome.CONNECTION, type(err).__name__
    return Call(route, result, status, start - t0, time.perf_counter() - start, code)


def session(connections: int, timeout_s: float) -> aiohttp.ClientSession:
    """One connection per client (kept alive), no cookies, ``timeout_s`` per request end to end."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def run_async(main: Coroutine[Any, Any, Any]) -> Any:
    """``asyncio.run`` on uvloop when it is installed (Ray Serve's uvicorn pulls it in): less client CPU per
    request, so the client is less of what a load run measures."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


@dataclass
class LoadRun:
    calls: list[Call]
    wall_s: float
    """From the first client's start to the last answer (the drain included)."""
    drain_s: float
    """From the deadline (no new requests) to the last answer."""
    client_cpu_s: float
    """CPU time of the event loop's thread: every client's work."""
    samples: list[tuple[float, Any]]
    """(seconds since start, ``sample()``) every ``sample_every_s``, and at each mark."""
    marks: dict[str, Any]


async def closed_loop(
    url: str,
    routes: Mapping[str, tuple[str, Sequence[bytes]]],
    weights: Sequence[float],
    clients: int,
    run_s: float,
    ramp_s: float = 0.0,
    backoff_s: float = 0.0,
    timeout_s: float = 120.0,
    seed: int = 0,
    sample: Callable[[], Any] | None = None,
    sample_every_s: float = 1.0,
    marks: Mapping[str, float] | None = None,
) -> LoadRun:
    """``clients`` clients, each on its own kept-alive connection, each sending its next request as soon as its
    last is answered (after ``backoff_s`` x U(0.5, 1.5) when that was a 503) until ``run_s`` seconds have passed;
    the requests then in flight are awaited. Client i starts at i/clients x ``ramp_s``. Each request goes to a route
    drawn by ``weights`` (``routes``: name -> (path, bodies)) with one of its bodies. ``sample()`` (e.g. memory)
    is called every ``sample_every_s`` and at each of ``marks`` (name -> seconds since start)."""
    loop = asyncio.get_running_loop()
    names = list(routes)
    calls: list[Call] = []
    samples: list[tuple[float, Any]] = []
    taken: dict[str, Any] = {}
    t0 = time.perf_counter()
    deadline = t0 + run_s
    cpu0 = time.thread_time()

    async def client(i: int, http: aiohttp.ClientSession) -> None:
        rng = random.Random(seed * 1_000_003 + i)
        await asyncio.sleep(i / clients * ramp_s)
        while time.perf_counter() < deadline:
            route = rng.choices(names, weights)[0]
            path, bodies = routes[route]
            call = await send(http, url + path, rng.choice(bodies), route, t0)
            calls.append(call)
            if call.outcome is Outcome.OVERLOADED and backoff_s > 0:
                await asyncio.sleep(min(backoff_s * rng.uniform(0.5, 1.5), max(deadline - time.perf_counter(), 0)))

    async def sampler() -> None:
        while True:
            samples.append((time.perf_counter() - t0, sample()))
            await asyncio.sleep(sample_every_s)

    def mark(name: str) -> None:
        taken[name] = sample()
        samples.append((time.perf_counter() - t0, taken[name]))

    handles = [loop.call_later(at, mark, name) for name, at in (marks or {}).items()] if sample else []
    task = loop.create_task(sampler()) if sample else None
    async with session(clients, timeout_s) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    end = time.perf_counter()
    if task is not None:
        task.cancel()
    for handle in handles:
        handle.cancel()
    return LoadRun(calls, end - t0, max(end - deadline, 0.0), time.thread_time() - cpu0, samples, taken)


# --- issue 14's abusive requests ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Abuse:
    name: str
    path: str
    status: int
    """The answer the app must give (413 body too large, 400 over a cap)."""
    in_flight: bool
    """Among the requests kept in flight while normal latency is measured (the issue's four)."""


ABUSES = (
    Abuse("10 MiB body", "/v1/embeddings", 413, True),
    Abuse("100k inputs", "/v1/embeddings", 400, True),
    Abuse("10k chat messages", "/v1/chat/completions", 400, True),
    Abuse("10k stop strings", "/v1/completions", 400, True),
    Abuse("10 MiB chunked body (no Content-Length)", "/v1/embeddings", 413, False),
)


def abusive_bodies(embed_model: str, generate_model: str) -> dict[str, Body]:
    """Each abusive request's body, by ``Abuse.name``: what a client that ignores the documented caps sends."""
    big = b'{"model": "' + embed_model.encode() + b'", "input": "' + b"x" * (10 * MIB) + b'"}'

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(big), CHUNK):
            yield big[start : start + CHUNK]

    dumps = lambda body: json.dumps(body).encode()  # noqa: E731
    return {
        ABUSES[0].name: big,
        ABUSES[1].name: dumps({"model": embed_model, "input": ["x"] * 100_000}),
        ABUSES[2].name: dumps(
            {"model": generate_model, "messages": [{"role": "user", "content": "x"}] * 10_000, "max_tokens": 1}
        ),
        ABUSES[3].name: dumps(
            {"model": generate_model, "prompt": "x", "max_tokens": 1, "stop": [f"s{i}" for i in range(10_000)]}
        ),
        ABUSES[4].name: chunked,
    }


async def abuse_forever(
    url: str, in_flight: int, bodies: Mapping[str, Body], stop: threading.Event, ready: Callable[[], None]
) -> Counter[tuple[str, str]]:
    """``in_flight`` clients, each sending the in-flight abuses in turn (client i starting at the i-th), the next
    as soon as the last is answered, until ``stop``; ``ready()`` once every client has had one answer."""
    kinds = [a for a in ABUSES if a.in_flight]
    counts: Counter[tuple[str, str]] = Counter()
    answered: set[int] = set()
    t0 = time.perf_counter()

    async def client(i: int, http: aiohttp.ClientSession) -> None:
        k = i
        while not stop.is_set():
            abuse = kinds[k % len(kinds)]
            k += 1
            call = await send(http, url + abuse.path, bodies[abuse.name], abuse.name, t0)
            counts[abuse.name, str(call.status) if call.status is not None else call.outcome.value] += 1
            if i not in answered:
                answered.add(i)
                if len(answered) == in_flight:
                    ready()

    async with session(in_flight, 60.0) as http:
        await asyncio.gather(*(client(i, http) for i in range(in_flight)))
    return counts


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _abuse_process(args: argparse.Namespace) -> None:
    """Prints ``{"ready": true}`` once every client has had an answer; on a line (or EOF) on stdin, stops and
    prints the answers counted and this process's CPU and wall time since its start-up as one JSON line."""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    bodies = abusive_bodies(args.embed_model, args.generate_model)
    started, cpu = time.perf_counter(), _cpu_s()
    counts = run_async(
        abuse_forever(args.url, args.in_flight, bodies, stop, lambda: print(json.dumps({"ready": True}), flush=True))
    )
    result = {
        "answers": [{"abuse": name, "status": status, "count": n} for (name, status), n in sorted(counts.items())],
        "cpu_s": _cpu_s() - cpu,
        "wall_s": time.perf_counter() - started,
    }
    print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    abuse = commands.add_parser("abuse", help="keep abusive requests in flight until a line arrives on stdin")
    abuse.add_argument("--url", required=True)
    abuse.add_argument("--in-flight", type=int, default=20)
    abuse.add_argument("--embed-model", default="recfound-q2i")
    abuse.add_argument("--generate-model", default="recfound-query_rewriting")
    _abuse_process(parser.parse_args(argv))


if __name__ == "__main__":
    main()

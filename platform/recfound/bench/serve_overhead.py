"""What the Ray Serve app adds over direct calls: the app over loopback HTTP against direct batched calls on the same
engine, in the same process (``jobs/benchmark.py serve``).

The app and its model are bench/serve.py's, with one replica so one Serve engine is compared with one in-process
engine. Each HTTP request carries one input (or ``embed_inputs_per_request`` texts); the direct side calls
``GRMEngine`` with the inputs of min(concurrency, max_batch_size) requests at a time, the most Serve's batcher can
join into one engine call.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import httpx
from ray import serve

from recfound.bench.common import Better, Report, Table, Target, fmt, interleaved, median, percentile, torch_threads
from recfound.bench.serve import ServeBench, free_port, model_deployment, publish_model, serve_config, served
from recfound.config import load_config
from recfound.model.formats import Side
from recfound.serving.engine import Engine
from recfound.serving.model import MODEL_DEPLOYMENT
from recfound.train.config import TrainConfig

THROUGHPUT_BOUND = {"tiny": 0.5}
"""Issue 14's Serve/direct embeddings throughput bound at concurrency 64, by backbone: 0.95x for a real model, 0.5x
for the tiny one, whose ~1 ms engine calls leave nothing to hide the per-request cost behind."""


def targets(backbone: str) -> list[Target]:
    return [
        Target(
            "Serve embeddings throughput / direct batched, concurrency 64",
            "embeddings_serve_vs_direct_c64",
            THROUGHPUT_BOUND.get(backbone, 0.95),
            Better.HIGHER,
        ),
        Target(
            "Serve embeddings added p50 latency (ms), concurrency 1", "embeddings_added_p50_ms_c1", 5.0, Better.LOWER
        ),
        Target(
            "streamed first token over HTTP / (1.2 x the engine's first token + a lone embedding's added p50)",
            "stream_first_token_vs_bound",
            1.0,
            Better.LOWER,
        ),
    ]


STREAM_SLACK = 1.2
"""Issue 14: a streamed completion's first token within 1.2x the engine's own first token plus what HTTP adds to
any request (a lone embedding's added p50)."""


class Endpoint(str, Enum):
    EMBEDDINGS = "embeddings"
    COMPLETIONS = "completions"


def run(bench: ServeBench) -> Report:
    """Serve and direct calls on the same published model, measured alternately; then where a lone request's time
    goes."""
    root = Path(bench.out_dir).resolve()
    published = publish_model(bench, root)
    engine, instruction = published.engine, published.instructions[bench.embed_task]["query"]
    texts = published.queries(bench.embed_task, bench.requests * bench.embed_inputs_per_request)
    prompts = published.prompts(bench.generate_task, bench.max_tokens, bench.completion_requests)

    config = serve_config(published.registry, free_port(), bench.batch_wait_s)
    model = model_deployment(config)
    max_batch = int(model["user_config"]["max_batch_size"])
    threads = max(1, math.floor(model.get("ray_actor_options", {}).get("num_cpus", 1)))
    with served(config, root / "serve.yaml") as url:
        rows = _measure(bench, url, engine, instruction, texts, prompts, max_batch, threads)
        breakdown = _breakdown(url, config["applications"][0]["name"], engine, bench, texts[0], instruction, threads)
        first = _first_token(url, engine, bench, prompts[0], threads)
    return _report(bench, rows, breakdown, first, config, max_batch, threads)


async def _http(url: str, bodies: Sequence[dict[str, Any]], concurrency: int) -> tuple[list[float], float]:
    """Per-request latency and total wall time of ``bodies`` with ``concurrency`` requests in flight; one
    untimed request per connection first, so connection set-up is not measured."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:

        async def send(body: dict[str, Any]) -> float:
            start = time.perf_counter()
            response = await client.post(url, json=body)
            if response.status_code != 200:
                raise RuntimeError(f"{url}: {response.status_code} {response.text[:300]}")
            return time.perf_counter() - start

        async def worker(queue: list[dict[str, Any]]) -> None:
            while queue:
                latencies.append(await send(queue.pop()))

        await asyncio.gather(*(send(bodies[0]) for _ in range(concurrency)))
        queue = list(reversed(bodies))
        start = time.perf_counter()
        await asyncio.gather(*(worker(queue) for _ in range(concurrency)))
        return latencies, time.perf_counter() - start


def _direct(
    call: Callable[[list[str]], object], requests: Sequence[list[str]], batch: int
) -> tuple[list[float], float]:
    """Per-call latency and total wall time of ``requests`` served ``batch`` requests per engine call, as Serve's
    batcher joins them at best; one untimed call first."""
    calls = [[x for request in requests[i : i + batch] for x in request] for i in range(0, len(requests), batch)]
    call(calls[0])
    latencies = []
    start = time.perf_counter()
    for inputs in calls:
        began = time.perf_counter()
        call(inputs)
        latencies.append(time.perf_counter() - began)
    return latencies, time.perf_counter() - start


def _measure(
    bench: ServeBench,
    url: str,
    engine: Engine,
    instruction: str,
    texts: list[str],
    prompts: list[str],
    max_batch: int,
    threads: int,
) -> list[dict[str, Any]]:
    """One row per (round, endpoint, level, side): latencies and wall time, Serve and direct alternating first."""
    k = bench.embed_inputs_per_request
    calls = {
        Endpoint.EMBEDDINGS: (
            [texts[i : i + k] for i in range(0, len(texts), k)],
            lambda g: {"model": f"recfound-{bench.embed_task}", "input": g if k > 1 else g[0]},
            lambda batch: engine.embed(bench.embed_task, batch, instruction, Side.QUERY),
        ),
        Endpoint.COMPLETIONS: (
            [[p] for p in prompts],
            lambda g: {
                "model": f"recfound-{bench.generate_task}",
                "prompt": g[0],
                "max_tokens": bench.max_tokens,
                "temperature": 0,
            },
            lambda batch: engine.generate(bench.generate_task, batch, bench.max_tokens, 0.0),
        ),
    }
    rows = []
    for r in range(bench.rounds):
        for level in bench.concurrency:
            for endpoint, (requests, body, call) in calls.items():
                for side in ["serve", "direct"] if r % 2 == 0 else ["direct", "serve"]:
                    if side == "serve":
                        bodies = [body(g) for g in requests]
                        latencies, wall = asyncio.run(_http(f"{url}/v1/{endpoint.value}", bodies, level))
                    else:
                        with torch_threads(threads):
                            latencies, wall = _direct(call, requests, min(level, max_batch))
                    rows.append(
                        {
                            "round": r,
                            "endpoint": endpoint.value,
                            "concurrency": level,
                            "side": side,
                            "inputs": sum(map(len, requests)),
                            "wall_s": wall,
                            "latencies_s": latencies,
                        }
                    )
    return rows


def _breakdown(
    url: str, app: str, engine: Engine, bench: ServeBench, text: str, instruction: str, threads: int
) -> dict[str, float]:
    """p50 ms of one lone embedding request entering at each layer, interleaved: where the added latency goes."""
    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app)
    body = {"model": f"recfound-{bench.embed_task}", "input": text}

    def engine_call() -> None:
        with torch_threads(threads):
            engine.embed(bench.embed_task, [text], instruction, Side.QUERY)

    with httpx.Client(timeout=60) as client:
        layers = {
            "engine call, in process": engine_call,
            "Model handle call (actor hop, token count, batcher, engine)": lambda: handle.embed.remote(
                bench.embed_task, [text]
            ).result(),
            "HTTP /healthz (proxy hop to the replica; no engine)": lambda: client.get(f"{url}/healthz"),
            "HTTP /v1/embeddings (all of the above)": lambda: client.post(f"{url}/v1/embeddings", json=body),
        }
        timing = interleaved(layers, rounds=bench.breakdown_rounds, warmup=3)
    return {layer: median(times) * 1e3 for layer, times in timing.wall.items()}


def _first_token(url: str, engine: Engine, bench: ServeBench, prompt: str, threads: int) -> dict[str, float]:
    """p50 ms until the first text of one greedy streamed completion (or the end of an empty one): the engine's
    own stream in process vs ``stream: true`` over HTTP, alternating which goes first; each stream is abandoned
    after its first text (its decoding stops) outside the timed part."""
    body = {
        "model": f"recfound-{bench.generate_task}",
        "prompt": prompt,
        "max_tokens": bench.max_tokens,
        "temperature": 0,
        "stream": True,
    }

    def direct() -> float:
        with torch_threads(threads):
            began, pieces = (
                time.perf_counter(),
                engine.stream(bench.generate_task, prompt, bench.max_tokens, 0.0, threading.Event()),
            )
            first = next((time.perf_counter() - began for piece in pieces if piece), None)
            pieces.close()
        return first if first is not None else time.perf_counter() - began

    def http(client: httpx.Client) -> float:
        began = time.perf_counter()
        with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            for line in response.iter_lines():
                event = line.removeprefix("data: ")
                if event.startswith("{"):
                    choice = json.loads(event)["choices"][0]
                    if choice["text"] or choice["finish_reason"]:
                        return time.perf_counter() - began
        raise RuntimeError(f"{url}/v1/completions: the stream ended without a text or a finish")

    times: dict[str, list[float]] = {"engine stream, in process": [], "HTTP stream: true": []}
    with httpx.Client(timeout=60) as client:
        for r in range(-2, bench.breakdown_rounds):  # two warm-up rounds
            sides = [("engine stream, in process", direct), ("HTTP stream: true", lambda: http(client))]
            for name, call in sides if r % 2 == 0 else sides[::-1]:
                took = call()
                if r >= 0:
                    times[name].append(took)
    return {name: median(values) * 1e3 for name, values in times.items()}


def _report(
    bench: ServeBench,
    rows: list[dict[str, Any]],
    breakdown: dict[str, float],
    first: dict[str, float],
    config: dict[str, Any],
    max_batch: int,
    threads: int,
) -> Report:
    ratios: dict[str, float] = {}
    figures: dict[str, Any] = {
        "max_batch_size": max_batch,
        "direct_torch_threads": threads,
        "batch_wait_timeout_s": model_deployment(config)["user_config"]["batch_wait_timeout_s"],
        "latency_breakdown_p50_ms": breakdown,
        "first_token_p50_ms": first,
        "runs": rows,
    }
    table_rows = []
    for endpoint in Endpoint:
        for level in bench.concurrency:
            serve_runs, direct_runs = (_runs(rows, endpoint, level, side) for side in ("serve", "direct"))
            key = f"{endpoint.value}_serve_vs_direct_c{level}"
            ratios[key] = median(
                [
                    (s["inputs"] / s["wall_s"]) / (d["inputs"] / d["wall_s"])
                    for s, d in zip(serve_runs, direct_runs, strict=True)
                ]
            )
            added = _latency(serve_runs, 50) - _latency(direct_runs, 50)
            figures[f"{endpoint.value}_added_p50_ms_c{level}"] = added
            figures[f"{endpoint.value}_c{level}"] = {
                "serve_per_s": _rate(serve_runs),
                "direct_per_s": _rate(direct_runs),
                "serve_p50_ms": _latency(serve_runs, 50),
                "serve_p99_ms": _latency(serve_runs, 99),
                "direct_p50_ms": _latency(direct_runs, 50),
                "direct_p99_ms": _latency(direct_runs, 99),
            }
            f = figures[f"{endpoint.value}_c{level}"]
            per_request = bench.embed_inputs_per_request if endpoint is Endpoint.EMBEDDINGS else 1
            table_rows.append(
                [
                    endpoint.value,
                    str(level),
                    str(min(level, max_batch) * per_request),
                    fmt(f["serve_per_s"]),
                    fmt(f["direct_per_s"]),
                    fmt(ratios[key]) + "x",
                    fmt(f["serve_p50_ms"]),
                    fmt(f["serve_p99_ms"]),
                    fmt(f["direct_p50_ms"]),
                    fmt(f["direct_p99_ms"]),
                    fmt(added),
                ]
            )
    headers = [
        "endpoint",
        "concurrency",
        "direct batch",
        "serve inputs/s",
        "direct inputs/s",
        "serve/direct",
        "serve p50 ms",
        "serve p99 ms",
        "direct p50 ms",
        "direct p99 ms",
        "added p50 ms",
    ]
    added = breakdown["HTTP /v1/embeddings (all of the above)"] - breakdown["engine call, in process"]
    bound = STREAM_SLACK * first["engine stream, in process"] + added
    ratios["stream_first_token_vs_bound"] = first["HTTP stream: true"] / bound
    tables = [
        Table("Ray Serve (HTTP, loopback) vs direct GRMEngine calls", headers, table_rows),
        Table(
            f"First streamed piece of a greedy completion (p50 of {bench.breakdown_rounds} interleaved rounds): "
            f"bound {STREAM_SLACK} x engine + {fmt(added)} ms added to a lone embedding = {fmt(bound)} ms",
            ["entry point", "p50 ms"],
            [[name, fmt(ms)] for name, ms in first.items()],
        ),
        Table(
            f"Where a lone embedding request's time goes (p50 of {bench.breakdown_rounds} interleaved rounds)",
            ["entry point", "p50 ms"],
            [[layer, fmt(ms)] for layer, ms in breakdown.items()],
        ),
    ]
    report = Report("serve", bench.model_dump(mode="json") | {"serve_config": config}, ratios, figures, tables)
    report.notes = [
        f"One Model replica (HTTP API and engine, one hop from the proxy); max_batch_size {max_batch}, "
        f"batch_wait_timeout_s {figures['batch_wait_timeout_s']}. Direct calls run in the benchmark process on "
        f"{threads} torch thread(s), as many as the replica's num_cpus gives it. Direct latency is per engine call "
        "(a batch); the HTTP client shares the machine's cores with the proxy and the replica. Completions: greedy, "
        f"{bench.max_tokens} new tokens."
    ]
    report.check(targets(load_config(TrainConfig, bench.config).model.backbone.name))
    return report


def _runs(rows: list[dict], endpoint: Endpoint, level: int, side: str) -> list[dict]:
    return [r for r in rows if (r["endpoint"], r["concurrency"], r["side"]) == (endpoint.value, level, side)]


def _rate(runs: list[dict]) -> float:
    return median([r["inputs"] / r["wall_s"] for r in runs])


def _latency(runs: list[dict], q: float) -> float:
    return percentile([x for r in runs for x in r["latencies_s"]], q) * 1e3

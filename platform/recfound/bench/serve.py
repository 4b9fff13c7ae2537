"""The Ray Serve app over loopback HTTP against direct batched calls on the same engine, in the same process.

A fresh GRM (its B = 0 experts cost what trained ones do) is published to a private registry with its item index
and served from the shipped serve/serve_config.yaml, started as operators do (``serve run``), with one replica so
one Serve engine is compared with one in-process engine. Each HTTP request carries one input (or
``embed_inputs_per_request`` texts); the direct side calls ``GRMEngine`` with the inputs of min(concurrency,
max_batch_size) requests at a time, the most Serve's batcher can join into one engine call.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import ray
import torch
import yaml
from pydantic import Field
from ray import serve

from recfound.artifacts import ADAPTER_DIR, hash_tree
from recfound.bench.common import (
    CONFIG_DIR,
    Better,
    Report,
    Table,
    Target,
    fmt,
    interleaved,
    median,
    percentile,
    torch_threads,
)
from recfound.config import Config, load_config
from recfound.data.builder import BuildConfig, build
from recfound.data.synthetic import SyntheticConfig
from recfound.io import read_json
from recfound.model.formats import Side
from recfound.model.grm import GRM
from recfound.serving.engine import ENGINE_KEY, Engine, load_engine
from recfound.serving.index import build_item_index, text_meta
from recfound.serving.model import MODEL_DEPLOYMENT
from recfound.serving.proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV
from recfound.serving.registry import publish, read_version, resolve
from recfound.tasks import DATASET_MANIFEST, EMBEDDING_TASKS, GENERATIVE_TASKS, ITEMS, task_path
from recfound.train.config import TrainConfig

REPO = CONFIG_DIR.parent
SERVE_CONFIG = REPO / "serve" / "serve_config.yaml"
GRM_ENGINE = "recfound.serving.engine:GRMEngine"
TARGETS = [
    Target(
        "Serve embeddings throughput / direct batched, concurrency 64",
        "embeddings_serve_vs_direct_c64",
        0.9,
        Better.HIGHER,
    ),
    Target("Serve embeddings added p50 latency (ms), concurrency 1", "embeddings_added_p50_ms_c1", 3.0, Better.LOWER),
]


class Endpoint(str, Enum):
    EMBEDDINGS = "embeddings"
    COMPLETIONS = "completions"


class ServeBench(Config):
    """Embeddings and completions through the Ray Serve app (HTTP on loopback) vs direct in-process batched
    calls on the same GRMEngine: throughput and p50/p99 latency at each concurrency, ratios, added p50."""

    config: str = str(CONFIG_DIR / "tiny.yaml")
    """Training config whose backbone and adapter the published model has."""
    concurrency: list[int] = [1, 8, 64]
    """Requests in flight (HTTP); the direct side calls the engine with min(concurrency, max_batch_size) requests'
    inputs at a time."""
    requests: int = Field(256, ge=1)
    """Embedding requests per concurrency level and round."""
    embed_inputs_per_request: int = Field(1, ge=1)
    """Texts per /v1/embeddings request (OpenAI accepts a list): more amortise the per-request cost."""
    completion_requests: int = Field(64, ge=1)
    """Completion requests per concurrency level and round (one prompt each)."""
    max_tokens: int = Field(16, ge=1)
    """Tokens generated per completion (greedy)."""
    rounds: int = Field(2, ge=1)
    """Rounds; each runs every (level, endpoint) through Serve and directly, in alternating order."""
    breakdown_rounds: int = Field(50, ge=1)
    """Lone embedding requests entering at each layer (engine, Model handle, HTTP) for the latency breakdown."""
    batch_wait_s: float | None = Field(None, ge=0)
    """Model user_config batch_wait_timeout_s; default: serve_config.yaml's. A lone request waits this long."""
    embed_task: str = "q2i"
    """Embedding task (model recfound-<task>); its dataset queries are the request texts."""
    generate_task: str = "query_rewriting"
    """Generative task (model recfound-<task>); its dataset prompts are the request prompts."""
    users: int = Field(300, ge=10)
    """Synthetic users of the dataset the texts and the item index come from."""
    items: int = Field(200, ge=20)
    """Synthetic items (the catalogue the publish step indexes)."""
    out_dir: str = "runs/bench/serve"
    """Dataset, artifact and registry of the benchmark (replaced)."""


def _artifact(cfg: TrainConfig, out: Path) -> Path:
    """What the merge job hands to publish: ``adapter/`` and a manifest with every file's SHA-256."""
    torch.manual_seed(cfg.seed)
    GRM.build(cfg.model.backbone, cfg.model.adapter.build(cfg.model.backbone)).save_pretrained(str(out / ADAPTER_DIR))
    files = hash_tree(out)
    (out / "manifest.json").write_text(json.dumps({"files": files}))
    return out


def _texts(data: Path, task: str, column: str, fits: Callable[[list[str]], list[bool]], n: int) -> list[str]:
    """``n`` texts of a task's train split (cycled) that fit the model's context."""
    texts = [
        str(t) for t in pq.read_table(data / task_path(task, "train"), columns=[column]).column(column).to_pylist()
    ]
    kept = [t for t, ok in zip(texts, fits(texts)) if ok and t.strip()]
    if not kept:
        raise ValueError(f"no {task} {column} fits the model's context")
    return [kept[i % len(kept)] for i in range(n)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_config(registry: str, port: int, batch_wait_s: float | None) -> dict[str, Any]:
    """The shipped config with this registry and port, one replica per deployment (no autoscaling mid-run)."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"]["registry"] = registry
    for deployment in app["deployments"]:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
        if deployment["name"] == MODEL_DEPLOYMENT and batch_wait_s is not None:
            deployment["user_config"]["batch_wait_timeout_s"] = batch_wait_s
    return config


def _model_deployment(config: dict[str, Any]) -> dict[str, Any]:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == MODEL_DEPLOYMENT)


def _start(config: dict[str, Any], path: Path) -> str:
    """``serve run --non-blocking`` of ``config`` on this driver's Ray; returns the base URL once healthy."""
    path.write_text(yaml.safe_dump(config))
    address = ray.get_runtime_context().gcs_address
    subprocess.run(
        [str(Path(sys.executable).parent / "serve"), "run", "--non-blocking", "--address", address, str(path)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    url = f"http://127.0.0.1:{config['http_options']['port']}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Serve app at {url} was not healthy within 300 s")


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


@dataclass
class Published:
    """A fresh GRM published with its item index to a private registry, and its engine loaded in this process."""

    data: Path
    registry: str
    engine: Engine
    instructions: dict[str, dict[str, str]]

    def queries(self, task: str, n: int) -> list[str]:
        """``n`` query texts of ``task`` that fit the context with the task's query instruction."""
        budget = self.engine.context_length
        n_instruction = self.engine.count_tokens([self.instructions[task]["query"]])[0]
        fits = lambda ts: [n_instruction + k <= budget for k in self.engine.count_tokens(ts)]  # noqa: E731
        return _texts(self.data, task, "query", fits, n)

    def prompts(self, task: str, max_tokens: int, n: int) -> list[str]:
        """``n`` prompts of ``task`` that leave room for ``max_tokens`` new tokens."""
        fits = lambda ps: [k + max_tokens <= self.engine.context_length for k in self.engine.count_tokens(ps)]  # noqa: E731
        return _texts(self.data, task, "prompt", fits, n)


def publish_model(bench: ServeBench, root: Path) -> Published:
    """Dataset, artifact and registry under ``root`` (replaced); the published version's engine loaded here."""
    if bench.embed_task not in EMBEDDING_TASKS or bench.generate_task not in GENERATIVE_TASKS:
        raise ValueError(f"embed_task must be one of {EMBEDDING_TASKS}, generate_task one of {GENERATIVE_TASKS}")
    cfg = load_config(TrainConfig, bench.config)
    shutil.rmtree(root, ignore_errors=True)
    data = root / "data"
    build(BuildConfig(out=str(data), synthetic=SyntheticConfig(users=bench.users, items=bench.items)))
    registry = str(root / "registry")
    meta = {ENGINE_KEY: GRM_ENGINE, **text_meta(read_json(str(data / DATASET_MANIFEST)))}
    publish(str(_artifact(cfg, root / "model")), registry, partial(build_item_index, items_url=str(data / ITEMS)), meta)
    version_dir = resolve(registry)
    return Published(data, registry, load_engine(version_dir), read_version(version_dir)["instructions"])


@contextmanager
def served(config: dict[str, Any], path: Path) -> Iterator[str]:
    """The app of ``config`` running (on this driver's Ray, or a local one started here); yields its base URL."""
    started_ray = not ray.is_initialized()
    if started_ray:  # the Model replica (1 CPU) beside the proxy: 2 logical CPUs even on a smaller machine
        os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)  # as serve_config.yaml says Ray is started
        ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        yield _start(config, path)
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()


def run(bench: ServeBench) -> Report:
    root = Path(bench.out_dir).resolve()
    published = publish_model(bench, root)
    engine, instruction = published.engine, published.instructions[bench.embed_task]["query"]
    texts = published.queries(bench.embed_task, bench.requests * bench.embed_inputs_per_request)
    prompts = published.prompts(bench.generate_task, bench.max_tokens, bench.completion_requests)

    config = _serve_config(published.registry, _free_port(), bench.batch_wait_s)
    model = _model_deployment(config)
    max_batch = int(model["user_config"]["max_batch_size"])
    threads = max(1, math.floor(model.get("ray_actor_options", {}).get("num_cpus", 1)))
    with served(config, root / "serve.yaml") as url:
        rows = _measure(bench, url, engine, instruction, texts, prompts, max_batch, threads)
        breakdown = _breakdown(url, config["applications"][0]["name"], engine, bench, texts[0], instruction, threads)
    return _report(bench, rows, breakdown, config, max_batch, threads)


def _report(
    bench: ServeBench,
    rows: list[dict[str, Any]],
    breakdown: dict[str, float],
    config: dict[str, Any],
    max_batch: int,
    threads: int,
) -> Report:
    ratios: dict[str, float] = {}
    figures: dict[str, Any] = {
        "max_batch_size": max_batch,
        "direct_torch_threads": threads,
        "batch_wait_timeout_s": _model_deployment(config)["user_config"]["batch_wait_timeout_s"],
        "latency_breakdown_p50_ms": breakdown,
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
    tables = [
        Table("Ray Serve (HTTP, loopback) vs direct GRMEngine calls", headers, table_rows),
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
    report.check(TARGETS)
    return report


def _runs(rows: list[dict], endpoint: Endpoint, level: int, side: str) -> list[dict]:
    return [r for r in rows if (r["endpoint"], r["concurrency"], r["side"]) == (endpoint.value, level, side)]


def _rate(runs: list[dict]) -> float:
    return median([r["inputs"] / r["wall_s"] for r in runs])


def _latency(runs: list[dict], q: float) -> float:
    return percentile([x for r in runs for x in r["latencies_s"]], q) * 1e3

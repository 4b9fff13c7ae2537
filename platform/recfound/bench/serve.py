"""The serve benchmarks' options and the app they all measure, so the three runs measure the same thing.

A fresh GRM (its B = 0 experts cost what trained ones do) is published with its item index to a private registry
and served from the shipped serve/serve_config.yaml, started as operators do (``serve run``), with one replica per
deployment. Here too: the requests the load and abuse clients send. The runs: Serve vs direct engine calls
(bench/serve_overhead.py), load (bench/serve_load.py, also the ``serve`` subcommand's entry) and abuse
(bench/serve_abuse.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import ray
import torch
import yaml
from pydantic import Field, field_validator
from ray import serve

from recfound.artifacts import ADAPTER_DIR, hash_tree
from recfound.bench.common import CONFIG_DIR
from recfound.config import Config, load_config
from recfound.data.builder import BuildConfig, build
from recfound.data.synthetic import SyntheticConfig
from recfound.io import read_json
from recfound.model.grm import GRM
from recfound.serving.engine import ENGINE_KEY, Engine, load_engine
from recfound.serving.index import build_item_index, text_meta
from recfound.serving.model import MODEL_DEPLOYMENT
from recfound.serving.proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV
from recfound.serving.publish import publish
from recfound.serving.registry import read_version, resolve
from recfound.tasks import DATASET_MANIFEST, EMBEDDING_TASKS, GENERATIVE_TASKS, ITEMS, task_path
from recfound.train.config import TrainConfig

REPO = CONFIG_DIR.parent
SERVE_CONFIG = REPO / "serve" / "serve_config.yaml"
GRM_ENGINE = "recfound.serving.engine:GRMEngine"
ROUTES = {"embeddings": "/v1/embeddings", "recommend": "/v1/recommend", "completions": "/v1/completions"}
RECOMMEND_TASK = "q2i"
BODIES_PER_ROUTE = 64


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


class ServeLoadBench(ServeBench):
    """Embeddings and completions through the Ray Serve app (HTTP on loopback) vs direct in-process batched
    calls on the same GRMEngine: throughput and p50/p99 latency at each concurrency, ratios, added p50.
    With --load: closed-loop clients at capacity, then at --overload x capacity (answers by status, latency,
    memory); with --abuse: oversized requests' answers and normal p99 while they are in flight (issue 14)."""

    load: bool = False
    """Run the load benchmark (clients at capacity, then overloaded) instead of the serve-vs-direct comparison."""
    abuse: bool = False
    """Run the abuse benchmark (oversized requests; normal p99 while they are in flight); with --load, both."""
    clients: int = Field(1000, ge=1)
    """Concurrent closed-loop clients of the load run; the app's capacity is this plus the Model's
    max_ongoing_requests (its max_queued_requests is set to this)."""
    mix: list[float] = [70, 20, 10]
    """Shares of embeddings, recommend and completions requests."""
    warmup_s: float = Field(10.0, ge=0)
    """Seconds of load before memory and latency are measured (clients start spread over min(warmup_s, 5))."""
    duration_s: float = Field(60.0, gt=0)
    """Measured seconds of the load run (requests then in flight are awaited)."""
    model_max_ongoing: int | None = Field(None, ge=1)
    """The Model deployment's max_ongoing_requests in the load runs; default: serve_config.yaml's."""
    overload: float = Field(2.0, gt=1)
    """Clients of the overload run, in multiples of the app's capacity."""
    overload_s: float = Field(30.0, gt=0)
    """Seconds of the overload run."""
    backoff_s: float = Field(5.0, ge=0)
    """After a 503 a client waits backoff_s x U(0.5, 1.5) before its next request."""
    client_timeout_s: float | None = Field(None, gt=0)
    """A request not answered within this many seconds counts as a timeout; default: the app's request_timeout_s
    + 30, so a timeout means the app did not answer, not even its 504."""
    abuse_repeats: int = Field(5, ge=1)
    """Times each abusive request is sent alone (median and max latency)."""
    abuse_in_flight: int = Field(20, ge=1)
    """Abusive requests kept in flight while normal embeddings latency is measured."""
    probe_clients: int = Field(4, ge=1)
    """Closed-loop clients of normal single-text embedding requests whose p99 is compared idle vs under abuse."""
    probe_s: float = Field(10.0, gt=0)
    """Seconds of each idle or abused probe window."""
    abuse_rounds: int = Field(2, ge=1)
    """Rounds of (idle, abused) probe windows, alternating which comes first."""

    @field_validator("mix")
    @classmethod
    def _three_shares(cls, mix: list[float]) -> list[float]:
        if len(mix) != len(ROUTES) or min(mix) < 0 or sum(mix) <= 0:
            raise ValueError(f"mix: {len(ROUTES)} non-negative shares ({', '.join(ROUTES)}), not all 0")
        return mix


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


def free_port() -> int:
    """A loopback port free now: the app gets its own, so a benchmark never meets another app's server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_config(registry: str, port: int, batch_wait_s: float | None) -> dict[str, Any]:
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


def model_deployment(config: dict[str, Any]) -> dict[str, Any]:
    """The Model deployment's entry of ``config``: where its batching and queue knobs are read and set."""
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


def request_bodies(bench: ServeBench, published: Published) -> dict[str, tuple[str, list[bytes]]]:
    """(path, ``BODIES_PER_ROUTE`` JSON bodies) per route of ``ROUTES``, encoded before the clients start so that
    the timed clients only send."""
    encode = lambda body: json.dumps(body).encode()  # noqa: E731
    queries = published.queries(RECOMMEND_TASK, BODIES_PER_ROUTE)
    texts = published.queries(bench.embed_task, BODIES_PER_ROUTE)
    prompts = published.prompts(bench.generate_task, bench.max_tokens, BODIES_PER_ROUTE)
    return {
        "embeddings": (
            ROUTES["embeddings"],
            [encode({"model": f"recfound-{bench.embed_task}", "input": t}) for t in texts],
        ),
        "recommend": (ROUTES["recommend"], [encode({"task": RECOMMEND_TASK, "query": q, "k": 10}) for q in queries]),
        "completions": (
            ROUTES["completions"],
            [
                encode({"model": f"recfound-{bench.generate_task}", "prompt": p, "max_tokens": bench.max_tokens})
                for p in prompts
            ],
        ),
    }


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

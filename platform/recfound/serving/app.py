"""The Ray Serve application: a batched model deployment behind an OpenAI-compatible FastAPI gateway.

Two deployments so each scales on its own resource: ``Model`` holds the engine and the item index (CPU or GPU
per ``ray_actor_options``) and batches requests with ``@serve.batch``; ``Gateway`` parses, validates and
authenticates HTTP and formats OpenAI responses. The model version is chosen by the Model's ``user_config``
(``{"version": "vN" | "latest"}``): changing it makes Serve call ``reconfigure`` on the running replicas, which
load the new version beside the live one and swap a single reference, so in-flight and new requests are
always answered (see ``roll_out``).
"""

# No ``from __future__ import annotations``: FastAPI reads the route signatures of the ingress class at runtime.
import asyncio
import json
import logging
import os
import re
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from recfound.config import Config
from recfound.serving.auth import authorized, load_token, require_auth_off_network
from recfound.serving.engine import Engine, Side, load_engine
from recfound.serving.index import DEFAULT_MAX_HISTORY, ItemIndex, SearchConfig, user_text
from recfound.serving.registry import LATEST_ALIAS, latest_version, read_version, resolve, verify
from recfound.serving.schemas import (
    QUERY_PARAM,
    VERSION_HEADER,
    ApiError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    ErrorType,
    Limits,
    RecommendedItem,
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

log = logging.getLogger("ray.serve")

APP_NAME = "recfound"
MODEL_DEPLOYMENT = "Model"
GATEWAY_DEPLOYMENT = "Gateway"
REGISTRY_ENV = "RECFOUND_REGISTRY"


class ModelUserConfig(Config):
    """The Model deployment's ``user_config``: changing it reconfigures running replicas in place."""

    version: str = LATEST_ALIAS
    """Registry version to serve (v1, v2, ...); `latest` follows the registry pointer when a replica loads."""
    max_batch_size: int = Field(16, ge=1)
    """Most requests one engine call serves."""
    batch_wait_timeout_s: float = Field(0.005, ge=0.0)
    """How long a batch waits to fill: latency traded for throughput."""


class AppArgs(Config):
    """Application ``args`` in serve_config.yaml."""

    registry: str | None = None
    """Registry URL; default $RECFOUND_REGISTRY as seen by the Serve controller."""
    cache_dir: str | None = None
    """Where replicas cache versions of a remote registry; default $RECFOUND_CACHE or ~/.cache/recfound."""
    search: SearchConfig = SearchConfig()
    limits: Limits = Limits()


@dataclass(frozen=True)
class Loaded:
    """One version, fully loaded: requests hold this snapshot, so a swap never mixes two versions."""

    version: str
    engine: Engine
    index: ItemIndex
    instructions: dict[str, dict[str, str]]
    max_history: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Engines need not be thread-safe (TMoLE routing is per-model state): one engine call at a time."""


def load_version(registry: str, version: str, search: SearchConfig, cache_dir: str | None) -> Loaded:
    """Resolve, verify every checksum, then load: a corrupted version raises before any of it is used."""
    path = resolve(registry, version, cache_dir)
    verify(path)
    meta = read_version(path)
    engine = load_engine(path)
    index = ItemIndex.load(path, search)
    return Loaded(engine.version, engine, index, meta["instructions"], meta.get("max_history", DEFAULT_MAX_HISTORY))


@dataclass(frozen=True)
class Embedded:
    version: str
    vectors: np.ndarray
    tokens: int


@dataclass(frozen=True)
class Generated:
    version: str
    texts: list[str]
    prompt_tokens: int
    completion_tokens: list[int]


def _embed_grouped(jobs: list[tuple[Loaded, str, list[str]]]) -> list[np.ndarray]:
    """One engine call per (version, task) in the batch; results back in job order."""
    groups: dict[tuple[int, str], list[int]] = defaultdict(list)
    for j, (live, task, _) in enumerate(jobs):
        groups[(id(live), task)].append(j)
    out: list[np.ndarray] = [np.empty(0)] * len(jobs)
    for members in groups.values():
        live, task, _ = jobs[members[0]]
        texts = [t for j in members for t in jobs[j][2]]
        with live.lock:
            vectors = live.engine.embed(task, texts, live.instructions[task]["query"], Side.QUERY)
        start = 0
        for j in members:
            out[j] = vectors[start : start + len(jobs[j][2])]
            start += len(jobs[j][2])
    return out


def _generate_grouped(jobs: list[tuple[Loaded, str, list[str], int, float]]) -> list[list[str]]:
    groups: dict[tuple[int, str, int, float], list[int]] = defaultdict(list)
    for j, (live, task, _, max_tokens, temperature) in enumerate(jobs):
        groups[(id(live), task, max_tokens, temperature)].append(j)
    out: list[list[str]] = [[] for _ in jobs]
    for members in groups.values():
        live, task, _, max_tokens, temperature = jobs[members[0]]
        with live.lock:
            texts = live.engine.generate(task, [p for j in members for p in jobs[j][2]], max_tokens, temperature)
        start = 0
        for j in members:
            out[j] = texts[start : start + len(jobs[j][2])]
            start += len(jobs[j][2])
    return out


def _context_error(param: str, index: int, tokens: int, limit: int, what: str) -> ApiError:
    return ApiError(
        400,
        f"{param}[{index}] needs {tokens} tokens ({what}), more than the model's context of {limit} tokens",
        param,
        "context_length_exceeded",
    )


@serve.deployment(name=MODEL_DEPLOYMENT, user_config=ModelUserConfig().model_dump(), max_ongoing_requests=64)
class Model:
    """Engine + item index of one registry version; swaps versions in ``reconfigure`` without downtime."""

    def __init__(self, registry: str, search: dict[str, Any], cache_dir: str | None = None):
        self._registry = registry
        self._search = SearchConfig.model_validate(search)
        self._cache_dir = cache_dir
        self._live: Loaded | None = None
        self._wanted: str | None = None
        self._loading: asyncio.Task[None] | None = None
        self._error: str | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Switch to the version ``user_config`` names without ever pausing requests.

        Serve takes a replica out of routing while ``reconfigure`` runs, so a switch only starts a background
        load and returns: the live version keeps answering until the new one is loaded and verified, then a
        single reference swap moves new requests over. A version that fails to load (checksum mismatch, missing
        files, a broken engine) is refused, logged and reported by /healthz, and the live one keeps serving.
        The first load is awaited, and its failure fails the replica: it has nothing to serve.
        """
        try:
            cfg = ModelUserConfig.model_validate(user_config)
            name = latest_version(self._registry) if cfg.version == LATEST_ALIAS else cfg.version
        except Exception as err:
            if self._live is None:
                raise
            self._refuse(str(user_config), err)
            return
        for batcher in (self._embed_batch, self._generate_batch):
            batcher.set_max_batch_size(cfg.max_batch_size)
            batcher.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._wanted = name
        if self._live is None:
            self._live = await asyncio.to_thread(self._load, name)
        elif name != self._live.version:
            # Keep a reference: the event loop holds tasks only weakly.
            self._loading = asyncio.create_task(self._switch(name))

    def _load(self, name: str) -> Loaded:
        loaded = load_version(self._registry, name, self._search, self._cache_dir)
        log.info("loaded version %s", loaded.version)
        return loaded

    async def _switch(self, name: str) -> None:
        try:
            loaded = await asyncio.to_thread(self._load, name)
        except Exception as err:
            self._refuse(name, err)
            return
        if self._wanted == name:  # a later reconfigure may have asked for another version meanwhile
            self._live, self._error = loaded, None
            log.info("serving version %s", name)

    def _refuse(self, name: str, err: Exception) -> None:
        self._error = f"refused version {name!r}: {err}"
        log.error("%s; still serving %s", self._error, self._live.version if self._live else None)

    def check_health(self) -> None:
        """Serve restarts a replica whose check fails: one that never loaded a version cannot serve."""
        if self._live is None:
            raise RuntimeError("no model version loaded: the deployment needs user_config {'version': ...}")

    def _require_live(self) -> Loaded:
        if self._live is None:
            raise ApiError(503, "no model version loaded yet", None, "not_ready", ErrorType.UNAVAILABLE)
        return self._live

    async def info(self) -> dict[str, Any]:
        live = self._require_live()
        return {"version": live.version, "last_error": self._error, "items": len(live.index.item_ids),
                "context_length": live.engine.context_length}  # fmt: skip

    def _check_embed_context(self, live: Loaded, task: str, texts: list[str], param: str) -> int:
        counts = live.engine.count_tokens([live.instructions[task]["query"], *texts])
        for i, n in enumerate(counts[1:]):
            if counts[0] + n > live.engine.context_length:
                raise _context_error(param, i, counts[0] + n, live.engine.context_length, "instruction included")
        return sum(counts[1:])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _embed_batch(self, jobs: list[tuple[Loaded, str, list[str]]]) -> list[np.ndarray]:
        return await asyncio.to_thread(_embed_grouped, jobs)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _generate_batch(self, jobs: list[tuple[Loaded, str, list[str], int, float]]) -> list[list[str]]:
        return await asyncio.to_thread(_generate_grouped, jobs)

    async def embed(self, task: str, texts: list[str]) -> Embedded:
        live = self._require_live()
        tokens = self._check_embed_context(live, task, texts, "input")
        return Embedded(live.version, await self._embed_batch((live, task, texts)), tokens)

    async def generate(self, task: str, prompts: list[str], max_tokens: int, temperature: float) -> Generated:
        live = self._require_live()
        counts = live.engine.count_tokens(prompts)
        for i, n in enumerate(counts):
            if n + max_tokens > live.engine.context_length:
                raise _context_error("prompt", i, n + max_tokens, live.engine.context_length,
                                     f"{n} in the prompt + {max_tokens} max_tokens")  # fmt: skip
        texts = await self._generate_batch((live, task, prompts, max_tokens, temperature))
        return Generated(live.version, texts, sum(counts), live.engine.count_tokens(texts))

    async def recommend(self, req: RecommendRequest) -> RecommendResponse:
        live = self._require_live()
        index = live.index
        exclude: list[int] = []
        if req.task == "u2i":
            history = _positions(index, req.history or [], "history")
            text = user_text([index.titles[p] for p in history], live.max_history)
            exclude = history if req.exclude_history else []
        elif req.task == "i2i":
            item = _positions(index, [req.item_id or ""], "item_id")
            text, exclude = index.texts[item[0]], item
        else:
            text = req.query or ""
        self._check_embed_context(live, req.task, [text], QUERY_PARAM[req.task])
        vectors = await self._embed_batch((live, req.task, [text]))
        hits = await asyncio.to_thread(index.search, req.task, vectors[0], req.k, exclude)
        items = [RecommendedItem(item_id=index.item_ids[p], title=index.titles[p], score=s) for p, s in hits]
        return RecommendResponse(task=req.task, version=live.version, items=items)


def _positions(index: ItemIndex, item_ids: list[str], param: str) -> list[int]:
    unknown = [i for i in item_ids if i not in index.position]
    if unknown:
        shown = ", ".join(repr(i) for i in unknown[:5])
        raise ApiError(400, f"unknown item id(s) in {param}: {shown}", param, "unknown_item")
    return [index.position[i] for i in item_ids]


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
        return _error(ApiError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}",
                               None, "invalid_json"))  # fmt: skip
    code = "missing_field" if first["type"] == "missing" else "invalid_type"
    return _error(ApiError(400, f"{where or 'body'}: {first['msg']}", where or None, code))


@api.exception_handler(HTTPException)
async def _http_error(_: Request, err: HTTPException) -> JSONResponse:
    error_type = ErrorType.NOT_FOUND if err.status_code == 404 else ErrorType.INVALID_REQUEST
    return _error(ApiError(err.status_code, str(err.detail), None, None, error_type))


@api.exception_handler(Exception)
async def _internal(_: Request, err: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return _error(ApiError(500, f"internal error: {type(err).__name__}", None, None, ErrorType.SERVER))


@api.middleware("http")
async def _auth(request: Request, call_next: Any) -> Any:
    """Bearer auth on /v1/*; /healthz stays open for load balancers and Kubernetes probes."""
    if request.url.path.startswith("/v1/") and not authorized(
        request.headers.get("authorization"), request.app.state.token
    ):
        return _error(ApiError(401, "missing or invalid bearer token", None, "invalid_api_key",
                               ErrorType.AUTHENTICATION))  # fmt: skip
    return await call_next(request)


def _proxy_host() -> str:
    """The address Serve's HTTP proxies bind (there is no public API for it; the controller client has it)."""
    from ray.serve.context import _get_global_client

    return _get_global_client().http_config.host


def _versioned(body: dict[str, Any] | BaseModel, version: str) -> JSONResponse:
    payload = body if isinstance(body, dict) else body.model_dump()
    return JSONResponse(payload, headers={VERSION_HEADER: version})


def _apply_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _pieces(text: str) -> list[str]:
    """Word-sized stream pieces that concatenate back to exactly ``text``."""
    return re.findall(r"\s*\S+|\s+$", text)


async def _sse(events: Iterator[dict[str, Any]]) -> AsyncIterator[str]:
    for event in events:
        yield f"data: {json.dumps(event)}\n\n"
    yield "data: [DONE]\n\n"


@serve.deployment(name=GATEWAY_DEPLOYMENT)
@serve.ingress(api)
class Gateway:
    """HTTP in, OpenAI/recommend JSON out; every answer carries the model version (field + header)."""

    def __init__(self, model: DeploymentHandle, limits: dict[str, Any]):
        self._model = model
        self._limits = Limits.model_validate(limits)
        token = load_token()
        require_auth_off_network(token, _proxy_host())
        api.state.token = token

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            info = await self._model.info.remote()
        except ApiError as err:
            return _error(err)
        return _versioned({"status": "ok", **info}, info["version"])

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        info = await self._model.info.remote()
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "recfound"} for name in model_names()]
        return _versioned({"object": "list", "data": data, "version": info["version"]}, info["version"])

    @api.post("/v1/embeddings")
    async def embeddings(self, req: EmbeddingRequest) -> JSONResponse:
        task = embedding_task(req.model)
        out: Embedded = await self._model.embed.remote(task, req.texts(self._limits))
        if req.dimensions is not None and req.dimensions != out.vectors.shape[1]:
            raise ApiError(400, f"dimensions={req.dimensions}; this model embeds in {out.vectors.shape[1]}",
                           "dimensions", "unsupported_value")  # fmt: skip
        return _versioned(embedding_response(req.model, out.version, out.vectors, out.tokens, req.encoding_format),
                          out.version)  # fmt: skip

    @api.post("/v1/completions")
    async def completions(self, req: CompletionRequest) -> Any:
        return await self._complete(req, req.prompts(self._limits), chat=False)

    @api.post("/v1/chat/completions")
    async def chat(self, req: ChatRequest) -> Any:
        return await self._complete(req, [req.prompt()], chat=True)

    async def _complete(self, req: CompletionRequest | ChatRequest, prompts: list[str], chat: bool) -> Any:
        task = generative_task(req.model)
        max_tokens = req.checked_max_tokens(self._limits)
        out: Generated = await self._model.generate.remote(task, prompts, max_tokens, req.temperature)
        texts, finish = [], []
        for text, tokens in zip(out.texts, out.completion_tokens, strict=True):
            text, stopped = _apply_stop(text, req.stops())
            texts.append(text)
            finish.append("stop" if stopped or tokens < max_tokens else "length")
        if not req.stream:
            body = completion_response(req.model, out.version, texts, finish, out.prompt_tokens,
                                       sum(out.completion_tokens), chat)  # fmt: skip
            return _versioned(body, out.version)
        cid = completion_id(chat)

        def events() -> Iterator[dict[str, Any]]:
            for i, text in enumerate(texts):
                if chat:
                    yield stream_chunk(cid, req.model, out.version, i, None, None, chat)
                for piece in _pieces(text):
                    yield stream_chunk(cid, req.model, out.version, i, piece, None, chat)
                yield stream_chunk(cid, req.model, out.version, i, "", finish[i], chat)

        return StreamingResponse(_sse(events()), media_type="text/event-stream",
                                 headers={VERSION_HEADER: out.version})  # fmt: skip

    @api.post("/v1/recommend")
    async def recommend(self, req: RecommendRequest) -> JSONResponse:
        req.check(self._limits)
        out: RecommendResponse = await self._model.recommend.remote(req)
        return _versioned(out, out.version)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for ``serve run`` / serve_config.yaml (``import_path: serve.app:app``)."""
    cfg = AppArgs.model_validate(args)
    registry = cfg.registry or os.environ.get(REGISTRY_ENV)
    if not registry:
        raise ValueError(f"no registry: set args.registry in the Serve config or {REGISTRY_ENV}")
    model = Model.bind(registry, cfg.search.model_dump(mode="json"), cfg.cache_dir)
    return Gateway.bind(model, cfg.limits.model_dump())


def roll_out(version: str, app_name: str = APP_NAME, timeout_s: float = 300.0) -> None:
    """Make a running, config-deployed app serve ``version`` with zero dropped requests.

    Re-applies the app's deployed config with only the Model's ``user_config.version`` changed — the same call
    ``serve deploy`` makes through the dashboard. Serve sees an unchanged code version, so it reconfigures the
    running replicas in place (no restarts); each loads the new version beside the live one and swaps. Returns
    once the deployment is healthy and answers with ``version``; raises if the replicas refused it.
    """
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    client = _get_global_client()
    details = client.get_serve_details()
    apps = {name: app.get("deployed_app_config") for name, app in details.get("applications", {}).items()}
    if apps.get(app_name) is None:
        raise RuntimeError(f"Serve app {app_name!r} is not running from a config (serve run/deploy serve_config.yaml)")
    deployments = apps[app_name].setdefault("deployments", [])
    entry = next((d for d in deployments if d.get("name") == MODEL_DEPLOYMENT), None)
    if entry is None:
        entry = {"name": MODEL_DEPLOYMENT}
        deployments.append(entry)
    entry["user_config"] = {**(entry.get("user_config") or {}), "version": version}
    client.deploy_apps(ServeDeploySchema.model_validate(
        {"applications": [a for a in apps.values() if a is not None], "target_capacity": details.get("target_capacity")}
    ))  # fmt: skip
    _wait_for_version(app_name, version, timeout_s)


def _wait_for_version(app_name: str, version: str, timeout_s: float) -> None:
    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications[app_name].deployments[MODEL_DEPLOYMENT].status
        if status == "HEALTHY":
            info = handle.info.remote().result()
            if info["version"] == version:
                return
            if info["last_error"] and repr(version) in info["last_error"]:
                raise RuntimeError(f"the Serve app refused {version}: {info['last_error']}")
        time.sleep(0.5)
    raise TimeoutError(f"Serve app {app_name!r} did not report version {version} within {timeout_s:.0f}s")

"""The Model deployment: one loaded registry version (engine + item index) behind the OpenAI-compatible FastAPI
app, in one replica, so a request goes from Serve's HTTP proxy straight to the replica that answers it.

CPU or GPU per ``ray_actor_options``. The version is chosen by the deployment's ``user_config``
(``{"version": "vN" | "latest"}``): changing it makes Serve call ``reconfigure`` on the running replicas, which
load the new version beside the live one and swap a single reference, so in-flight and new requests are
always answered. A version that fails to verify or load is refused and the live one keeps serving.

Overload is refused before the replica: Serve's router sends a replica at most ``max_ongoing_requests`` and holds
``max_queued_requests`` more; beyond that the proxy answers 503 at once (serving/proxy.py puts it in OpenAI's
error schema). The queued ones reach the replica as its slots free (``ROUTER_BACKOFF``).
"""

# No ``from __future__ import annotations``: FastAPI reads the route signatures of the ingress class at runtime.
import asyncio
import logging
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import Field
from ray import serve

from recfound.config import Config
from recfound.serving.api import HEALTHZ, api, configure, has_token, versioned, within_timeout
from recfound.serving.auth import TokenSource, require_auth_off_network
from recfound.serving.completions import complete
from recfound.serving.errors import ApiError
from recfound.serving.index import SearchConfig
from recfound.serving.inference import Embedded, Inference
from recfound.serving.limits import Limits
from recfound.serving.live import LiveVersion, load_version, probe
from recfound.serving.registry import LATEST_ALIAS, latest_version
from recfound.serving.responses import embedding_response
from recfound.serving.schemas import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    RankRequest,
    RecommendRequest,
    embedding_task,
    model_names,
)

log = logging.getLogger("ray.serve")

MODEL_DEPLOYMENT = "Model"


class ModelUserConfig(Config):
    """The Model deployment's ``user_config``: changing it reconfigures running replicas in place."""

    version: str = LATEST_ALIAS
    """Registry version to serve (v1, v2, ...); `latest`: the registry's latest when the app was deployed, pinned
    then so that replicas added later (autoscaling, restarts) serve the same version as the others. A newer
    version is rolled out explicitly (jobs/publish.py serve=auto, or a new `serve deploy`)."""
    max_batch_size: int = Field(16, ge=1)
    """Most requests one Serve batch gathers (their texts of one task go to the engine together)."""
    max_batch_tokens: int = Field(16384, ge=1)
    """Most padded tokens (texts x the longest, instruction included) one embedding engine call takes, as
    text-embeddings-inference bounds its batches: a batch's texts are cut into calls by length, shortest first, so
    256 long texts never go to the engine as one padded tensor, and similar lengths share a call (less padding).
    Larger: fewer calls, more memory per call."""
    batch_wait_timeout_s: float = Field(0.005, ge=0.0)
    """How long a batch waits to fill: latency traded for throughput."""
    max_engine_call_s: float = Field(600.0, gt=0.0)
    """A replica whose engine has been inside one call longer than this fails its health check and is replaced
    (a wedged engine). Set it above the slowest legitimate batch (a full batch of the longest completions)."""


class ModelReplica(Inference):
    """HTTP in, OpenAI/recommend JSON out, from the engine + item index of one registry version; swaps versions in
    ``reconfigure`` without downtime. Every answer carries the model version (field + header). ``Model`` is this
    class deployed; tests build it in process."""

    def __init__(
        self,
        registry: str,
        search: dict[str, Any],
        cache_dir: str | None = None,
        pinned: str | None = None,
        limits: dict[str, Any] | None = None,
    ):
        super().__init__(ModelUserConfig().max_batch_tokens)
        self._registry = registry
        self._pinned = pinned
        self._search = SearchConfig.model_validate(search)
        self._limits = Limits.model_validate(limits or {})
        self._max_engine_call_s = ModelUserConfig().max_engine_call_s
        self._cache_dir = cache_dir
        self._wanted: str | None = None
        self._loading: asyncio.Task[None] | None = None
        self._error: str | None = None
        token, host = TokenSource(), _proxy_host()
        if host is not None:
            require_auth_off_network(token.token, host)
        configure(self._limits, token)

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
            name = cfg.version if cfg.version != LATEST_ALIAS else self._pinned or latest_version(self._registry)
        except Exception as err:
            if self._live is None:
                raise
            self._refuse(str(user_config), err)
            return
        self._batching(cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.max_batch_tokens)
        self._max_engine_call_s = cfg.max_engine_call_s
        self._wanted = name
        if self._live is None:
            self._go_live(await asyncio.to_thread(self._load, name))
        elif name != self._live.version:
            # Keep a reference: the event loop holds tasks only weakly.
            self._loading = asyncio.create_task(self._switch(name))

    def _load(self, name: str) -> LiveVersion:
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
            self._go_live(loaded)
            self._error = None
            log.info("serving version %s", name)

    def _go_live(self, loaded: LiveVersion) -> None:
        previous, self._live = self._live, loaded
        self._metrics.serving(loaded.version, previous.version if previous else None)

    def _refuse(self, name: str, err: Exception) -> None:
        self._error = f"refused version {name!r}: {err}"
        log.error("%s; still serving %s", self._error, self._live.version if self._live else None)

    async def check_health(self) -> None:
        """Serve replaces a replica whose check fails: one with no version, one whose engine has been inside a
        single call for over ``max_engine_call_s`` (wedged), or one whose probe embedding fails."""
        live = self._live
        if live is None:
            raise RuntimeError("no model version loaded: the deployment needs user_config {'version': ...}")
        busy = live.busiest()
        if busy is not None and busy > self._max_engine_call_s:
            raise RuntimeError(
                f"engine inside one call for {busy:.0f} s, over max_engine_call_s={self._max_engine_call_s:g}: wedged"
            )
        await asyncio.to_thread(probe, live)

    async def info(self) -> dict[str, Any]:
        live = self._require_live()
        return {
            "version": live.version,
            "last_error": self._error,
            "items": len(live.index.item_ids),
            "context_length": live.engine.context_length,
        }

    @api.get(HEALTHZ)
    async def get_healthz(self, request: Request) -> JSONResponse:
        """Up (200) or down (503) and the version for anyone; the details (``last_error`` names local paths, the
        index size, the context length) only with the token, or when auth is off."""
        info = await self.info()
        detail = info if has_token(request) else {"version": info["version"]}
        return versioned({"status": "ok", **detail}, info["version"])

    @api.get("/v1/models")
    async def get_models(self) -> JSONResponse:
        version = self._require_live().version
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "recfound"} for name in model_names()]
        return versioned({"object": "list", "data": data, "version": version}, version)

    @api.post("/v1/embeddings")
    async def post_embeddings(self, req: EmbeddingRequest) -> JSONResponse:
        task = embedding_task(req.model)
        out: Embedded = await within_timeout(self.embed(task, req.texts(self._limits)), self._limits)
        if req.dimensions is not None and req.dimensions != out.vectors.shape[1]:
            raise ApiError(
                400,
                f"dimensions={req.dimensions}; this model embeds in {out.vectors.shape[1]}",
                "dimensions",
                "unsupported_value",
            )
        return versioned(
            embedding_response(req.model, out.version, out.vectors, out.tokens, req.encoding_format), out.version
        )

    @api.post("/v1/completions")
    async def post_completions(self, req: CompletionRequest) -> Any:
        return await complete(self, req, req.prompts(self._limits), self._limits, chat=False)

    @api.post("/v1/chat/completions")
    async def post_chat_completions(self, req: ChatRequest) -> Any:
        return await complete(self, req, [req.prompt(self._limits)], self._limits, chat=True)

    @api.post("/v1/recommend")
    async def post_recommend(self, req: RecommendRequest) -> JSONResponse:
        req.check(self._limits)
        out = await within_timeout(self.recommend(req), self._limits)
        return versioned(out, out.version)

    @api.post("/v1/rank")
    async def post_rank(self, req: RankRequest) -> JSONResponse:
        """A candidate list ordered by the model: every candidate once, best first, in /v1/recommend's shape."""
        req.check(self._limits)
        out = await within_timeout(self.rank(req), self._limits)
        return versioned(out, out.version)


ROUTER_BACKOFF = {"initial_backoff_s": 0.001, "max_backoff_s": 0.005}
"""How long the proxy's router waits between attempts to route a queued request. Ray's default (0.025 s doubling to
0.5 s) starves the replica while a queue persists: 1,000 closed-loop clients got 4 answers/s from an idle replica
(99/s with 0.02 s, 87/s with 0.002 s: then the 2 cores are the bound). Smaller: queued requests reach a freed slot
sooner; each wait of a saturated replica costs one queue-length probe of it."""

Model = serve.deployment(
    name=MODEL_DEPLOYMENT,
    user_config=ModelUserConfig().model_dump(),
    max_ongoing_requests=64,
    request_router_config=ROUTER_BACKOFF,
)(serve.ingress(api)(ModelReplica))


def _proxy_host() -> str | None:
    """The address Serve's HTTP proxies bind (there is no public API for it; the controller client has it); None
    for a replica class built outside Serve (in process, by a test), which no proxy serves."""
    from ray.serve.context import _get_global_client, _get_internal_replica_context

    if _get_internal_replica_context() is None:
        return None
    return _get_global_client().http_config.host

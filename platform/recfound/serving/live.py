"""One loaded registry version as a replica holds it: engine, item index and the locks that let a health check
tell a busy engine from a wedged one."""

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from recfound.model.formats import Side
from recfound.serving.engine import Engine, load_engine
from recfound.serving.index import DEFAULT_MAX_HISTORY, ItemIndex, SearchConfig
from recfound.serving.registry import read_version, resolve_verified


class EngineLock:
    """One engine call of a kind at a time, remembering since when the current one runs: the health check tells a
    busy engine (fine) from a wedged one (replace the replica)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None

    def acquire(self, blocking: bool = True) -> bool:
        if not self._lock.acquire(blocking):
            return False
        self._since = time.monotonic()
        return True

    def release(self) -> None:
        self._since = None
        self._lock.release()

    def __enter__(self) -> "EngineLock":
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def held_for(self) -> float | None:
        """Seconds the running call has taken so far; None when the engine is idle."""
        since = self._since
        return None if since is None else time.monotonic() - since


@dataclass(frozen=True)
class LiveVersion:
    """One version, fully loaded: requests hold this snapshot, so a swap never mixes two versions."""

    version: str
    engine: Engine
    index: ItemIndex
    instructions: dict[str, dict[str, str]]
    max_history: int
    embed_lock: EngineLock = field(default_factory=EngineLock)
    """One embedding call at a time (embeddings batch several requests into one call anyway)."""
    generate_lock: EngineLock = field(default_factory=EngineLock)
    """One generation or choice call at a time. Separate from ``embed_lock`` so a long completion never stalls
    retrieval: the two run in their own threads (TMoLE routing is thread-private, a ContextVar; the only state
    they share is the folded-weight cache, whose entries are whole tensors swapped under the GIL)."""

    def busiest(self) -> float | None:
        """Seconds the longest-running engine call has taken so far; None when the engine is idle."""
        held = [t for t in (self.embed_lock.held_for(), self.generate_lock.held_for()) if t is not None]
        return max(held, default=None)


def probe(live: LiveVersion) -> None:
    """Embed one short text and check the vector is finite; skipped while a request holds the engine (that
    request exercises it, and waiting for it could outlast Serve's health-check timeout)."""
    served = [t for t in live.engine.tasks if t in live.instructions]  # the embedding tasks it serves
    if not served or not live.embed_lock.acquire(blocking=False):
        return
    task = "q2i" if "q2i" in served else served[0]
    try:
        vectors = live.engine.embed(task, ["health check"], live.instructions[task]["query"], Side.QUERY)
    finally:
        live.embed_lock.release()
    if vectors.shape[0] != 1 or not np.isfinite(vectors).all():
        raise RuntimeError(f"version {live.version}: the engine's probe embedding is not a finite vector")


def load_version(registry: str, version: str, search: SearchConfig, cache_dir: str | None) -> LiveVersion:
    """Resolve, verify every checksum, then load: a corrupted version raises before any of it is used."""
    path = resolve_verified(registry, version, cache_dir)
    meta = read_version(path)
    engine = load_engine(path)
    index = ItemIndex.load(path, search)
    history = meta.get("max_history", DEFAULT_MAX_HISTORY)
    return LiveVersion(engine.version, engine, index, meta["instructions"], history)

"""The item index: every catalogue item embedded once per retrieval task, and top-K search over it.

Stored inside a registry version (``index/items.parquet`` with item_id/title/text, ``index/<task>.npy`` with
float32 (n_items, d) rows in the same order), so a version always searches with vectors from its own weights.
Items are embedded with each task's item-side instruction (the one the dataset trained the item side with);
queries and users with the task's first query-side instruction.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field

from recfound.config import Config
from recfound.data.templates import TEMPLATE_VERSION, history_text, served_instructions
from recfound.model.formats import Side
from recfound.serving.engine import load_engine
from recfound.serving.registry import read_version
from recfound.tasks import EMBEDDING_TASKS

log = logging.getLogger(__name__)

INDEX_DIR = "index"
ITEMS_FILE = f"{INDEX_DIR}/items.parquet"
DEFAULT_MAX_HISTORY = 20
"""The dataset builder's default ``max_history``, used when the dataset manifest does not record one."""


def vectors_file(task: str) -> str:
    return f"{INDEX_DIR}/{task}.npy"


def instructions_from_templates() -> dict[str, dict[str, str]]:
    """{task: {"query", "item"}} recorded in version.json, so serving keeps the wording the model trained with
    even if the templates change later."""
    return {t: served_instructions(t) for t in EMBEDDING_TASKS}


def text_meta(dataset_manifest: dict) -> dict[str, object]:
    """What serving must copy from the dataset to render queries exactly as training did."""
    version = dataset_manifest.get("template_version", TEMPLATE_VERSION)
    if version != TEMPLATE_VERSION:
        raise ValueError(f"dataset was built with templates v{version}, this code has v{TEMPLATE_VERSION}")
    max_history = dataset_manifest.get("config", {}).get("max_history", DEFAULT_MAX_HISTORY)
    return {"instructions": instructions_from_templates(), "template_version": version, "max_history": max_history}


def user_text(titles: Sequence[str], max_history: int) -> str:
    """A user as the u2i query side saw it in training: the last ``max_history`` titles, oldest first.

    The rendering itself is ``recfound.data.templates.history_text``, shared with the dataset builder.
    """
    return history_text(list(titles)[-max_history:])


def build_item_index(version_dir: str, items_url: str, batch_size: int = 64) -> None:
    """Embed the catalogue at ``items_url`` (items.parquet) with the version's engine into ``version_dir/index``."""
    table = pq.read_table(items_url, columns=["item_id", "title", "text"]).to_pylist()
    if not table:
        raise ValueError(f"{items_url}: empty catalogue, nothing to index")
    ids = [str(row["item_id"]) for row in table]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{items_url}: duplicate item ids")
    titles = [row["title"] or "" for row in table]
    texts = [row["text"] or row["title"] or "" for row in table]
    engine = load_engine(version_dir)
    instructions = read_version(version_dir)["instructions"]
    (Path(version_dir) / INDEX_DIR).mkdir(exist_ok=True)
    for task in [t for t in EMBEDDING_TASKS if t in engine.tasks]:  # an export: its one task
        parts = [
            engine.embed(task, texts[i : i + batch_size], instructions[task]["item"], Side.ITEM)
            for i in range(0, len(texts), batch_size)
        ]
        vectors = np.concatenate(parts).astype(np.float32)
        _check_vectors(vectors, len(texts), task)
        np.save(Path(version_dir) / vectors_file(task), vectors, allow_pickle=False)
        log.info("indexed %d items for %s (d=%d)", len(ids), task, vectors.shape[1])
    pq.write_table(pa.table({"item_id": ids, "title": titles, "text": texts}), Path(version_dir) / ITEMS_FILE)


def _check_vectors(vectors: np.ndarray, n: int, task: str) -> None:
    if vectors.ndim != 2 or vectors.shape[0] != n:
        raise ValueError(f"{task}: engine returned shape {vectors.shape} for {n} items")
    norms = np.linalg.norm(vectors, axis=1)
    if not np.all(np.isfinite(vectors)) or not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError(f"{task}: engine returned non-finite or non-normalised embeddings")


class SearchKind(str, Enum):
    """auto: exact below ``ivf_min_items`` items, ivf from there; exact: score every item; ivf: faiss inverted
    file (approximate)."""

    AUTO = "auto"
    EXACT = "exact"
    IVF = "ivf"


class SearchConfig(Config):
    kind: SearchKind = SearchKind.AUTO
    """auto: exact below `ivf_min_items` items, ivf from there; exact: one matrix-vector product over every item
    (~17 ms/query at 1M x 64 on 2 cores); ivf: scores only the items in the `nprobe` nearest of `nlist` k-means
    lists (faiss IndexIVFFlat; approximate, ~0.65 ms at 1M)."""
    ivf_min_items: int = Field(500_000, ge=1)
    """auto: catalogue size from which ivf is used. Exact search time grows with items x dim: at d=64 on 2 cores
    it reaches ~10 ms/query at 500k items (9 ms measured; `python jobs/benchmark.py search` measures a machine)."""
    nlist: int | None = Field(None, ge=1)
    """ivf: number of k-means lists; default sqrt(items), at most items/39 so every list trains on enough points."""
    nprobe: int = Field(32, ge=1)
    """ivf: lists scanned per query; more is slower and closer to exact (recall@10 ~0.95 at 32 on the benchmark's
    clustered 1M items)."""
    seed: int = 0
    """ivf: k-means seed, so every replica builds the same lists and answers alike."""

    def kind_for(self, items: int) -> SearchKind:
        """The search a catalogue of ``items`` gets: ``auto`` resolved by ``ivf_min_items``."""
        if self.kind is not SearchKind.AUTO:
            return self.kind
        return SearchKind.IVF if items >= self.ivf_min_items else SearchKind.EXACT


Hit = tuple[int, float]


class Search(Protocol):
    """Top-K search over one task's item vectors, and the rows /v1/rank scores."""

    def search(self, query: np.ndarray, k: int, exclude: Sequence[int] = ()) -> list[Hit]: ...

    def rows(self, positions: Sequence[int]) -> np.ndarray: ...


class ExactSearch:
    """Every item scored by one matrix-vector product over the loaded matrix, in place (never copied).

    Kept in torch rather than faiss ``IndexFlatIP``: at 1M x 64, one query, 2 cores, ``torch.mv`` + topk takes
    ~16-20 ms (memory bound; the product is ~14 ms of it) while IndexFlatIP takes ~80 ms, as faiss parallelises
    a flat search over queries and so scans a lone query on one thread; faiss would also hold its own copy.
    """

    def __init__(self, vectors: np.ndarray):
        self.vectors = torch.from_numpy(vectors)

    def search(self, query: np.ndarray, k: int, exclude: Sequence[int] = ()) -> list[Hit]:
        scores = self.vectors @ torch.from_numpy(np.asarray(query, dtype=np.float32))
        if exclude:
            scores[torch.tensor(list(exclude))] = -math.inf
        top = scores.topk(min(k, scores.shape[0]))
        return [(int(i), float(s)) for i, s in zip(top.indices, top.values, strict=True) if s != -math.inf]

    def rows(self, positions: Sequence[int]) -> np.ndarray:
        return self.vectors[torch.tensor(list(positions))].numpy()


class IVFSearch:
    """faiss ``IndexIVFFlat`` (inner product on the unit vectors = cosine): spherical k-means lists; a query
    scores the items of its ``nprobe`` nearest lists.

    The index is the only copy of the vectors (the loaded matrix is dropped); /v1/rank's rows come back through
    its direct map. k-means trains on ``TRAIN_PER_LIST`` items per list for ``ITERATIONS`` rounds with a fixed
    seed: at 100k clustered items, faiss's defaults (256 per list, 25 rounds) took 4-8x longer to train for
    +0.003-0.01 recall@10, and every replica builds this index when it loads a version. ``nprobe`` and the
    exclusions travel in per-call search parameters, so concurrent searches never mutate the shared index.
    Exclusions are a faiss ID selector (excluded items never enter the heap): it added ~0.05-0.1 ms per query
    with 200 excluded at 100k-1M items, less than over-fetching k + len(exclude) and filtering.
    """

    TRAIN_PER_LIST = 64
    MIN_PER_LIST = 39  # faiss's own minimum (ClusteringParameters.min_points_per_centroid)
    ITERATIONS = 10

    def __init__(self, vectors: np.ndarray, nlist: int | None, nprobe: int, seed: int):
        n, d = vectors.shape
        self.nlist = self.clamp_nlist(n, nlist or math.isqrt(n))
        self.nprobe = nprobe
        self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, self.nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.seed = seed
        self.index.cp.spherical = True
        self.index.cp.niter = self.ITERATIONS
        self.index.cp.max_points_per_centroid = self.TRAIN_PER_LIST
        self.index.train(vectors)
        self.index.add(vectors)
        self.index.make_direct_map()

    @classmethod
    def clamp_nlist(cls, items: int, nlist: int) -> int:
        """At most one list per ``MIN_PER_LIST`` items (faiss warns below that), at least one."""
        return max(1, min(nlist, items // cls.MIN_PER_LIST))

    def search(self, query: np.ndarray, k: int, exclude: Sequence[int] = ()) -> list[Hit]:
        selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.asarray(exclude, dtype=np.int64))) if exclude else None
        params = faiss.SearchParametersIVF(nprobe=self.nprobe, sel=selector)
        scores, ids = self.index.search(np.asarray(query, dtype=np.float32)[None], k, params=params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def rows(self, positions: Sequence[int]) -> np.ndarray:
        return self.index.reconstruct_batch(np.asarray(positions, dtype=np.int64))


def build_search(vectors: np.ndarray, config: SearchConfig) -> Search:
    """The search ``config`` picks for ``vectors`` (float32 unit rows)."""
    if config.kind_for(vectors.shape[0]) is SearchKind.EXACT:
        return ExactSearch(vectors)
    start = time.perf_counter()
    ivf = IVFSearch(vectors, config.nlist, config.nprobe, config.seed)
    log.info("ivf over %d items: %d lists in %.1f s", vectors.shape[0], ivf.nlist, time.perf_counter() - start)
    return ivf


@dataclass
class ItemIndex:
    """The catalogue of one version and its per-task search, by cosine similarity."""

    item_ids: list[str]
    titles: list[str]
    texts: list[str]
    searches: dict[str, Search]

    @classmethod
    def load(cls, version_dir: str, search: SearchConfig) -> ItemIndex:
        table = pq.read_table(Path(version_dir) / ITEMS_FILE).to_pydict()
        searches = {
            task: build_search(np.load(Path(version_dir) / vectors_file(task), allow_pickle=False), search)
            for task in EMBEDDING_TASKS
            if (Path(version_dir) / vectors_file(task)).is_file()  # the tasks its engine serves
        }
        return cls(table["item_id"], table["title"], table["text"], searches)

    def __post_init__(self) -> None:
        self.position = {item: i for i, item in enumerate(self.item_ids)}

    def score(self, task: str, query: np.ndarray, positions: Sequence[int]) -> np.ndarray:
        """Cosine score of each item at ``positions`` (exact; the rows of a candidate list only)."""
        return self.searches[task].rows(positions) @ np.asarray(query, dtype=np.float32)

    def search(self, task: str, query: np.ndarray, k: int, exclude: Sequence[int] = ()) -> list[Hit]:
        """Top ``k`` (position, cosine score), best first, never returning positions in ``exclude``."""
        return self.searches[task].search(query, k, exclude)

"""The item index: every catalogue item embedded once per retrieval task, and top-K search over it.

Stored inside a registry version (``index/items.parquet`` with item_id/title/text, ``index/<task>.npy`` with
float32 (n_items, d) rows in the same order), so a version always searches with vectors from its own weights.
Items are embedded with each task's item-side instruction (the one the dataset trained the item side with);
queries and users with the task's first query-side instruction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recfound.config import Config
from recfound.data.templates import ITEM_INSTRUCTIONS, QUERY_INSTRUCTIONS, TEMPLATE_VERSION, history_text
from recfound.serving.engine import Side, load_engine
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
    return {t: {"query": QUERY_INSTRUCTIONS[t][0], "item": ITEM_INSTRUCTIONS[t]} for t in EMBEDDING_TASKS}


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
    for task in EMBEDDING_TASKS:
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
    """exact: one matmul over every item (right up to ~1M items on CPU); ivf: k-means buckets, probe a few."""

    EXACT = "exact"
    IVF = "ivf"


class SearchConfig(Config):
    kind: SearchKind = SearchKind.EXACT
    """exact scores every item; ivf scores only the items in the `nprobe` nearest k-means buckets (approximate)."""
    nlist: int | None = None
    """ivf: number of k-means buckets; default sqrt(number of items)."""
    nprobe: int = 8
    """ivf: buckets scanned per query; more is slower and closer to exact."""
    seed: int = 0
    """ivf: k-means initialisation seed, so every replica builds the same buckets."""


Hit = tuple[int, float]


class IVF:
    """Inverted-file ANN: spherical k-means buckets; a query scores only the items of its ``nprobe`` nearest.

    Centroids train on a sample (``TRAIN_PER_LIST`` items per bucket, as faiss does) and every item is then
    assigned in chunks, so building stays linear in the catalogue and never materialises an (n, nlist) matrix.
    """

    TRAIN_PER_LIST = 64
    CHUNK = 65536

    def __init__(self, vectors: torch.Tensor, nlist: int, seed: int, iters: int = 10):
        nlist = max(1, min(nlist, vectors.shape[0]))
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(vectors.shape[0], generator=gen)
        sample = vectors[order[: nlist * self.TRAIN_PER_LIST]]
        centroids = sample[:nlist].clone()
        for _ in range(iters):
            assign = (sample @ centroids.T).argmax(dim=1)
            sums = torch.zeros_like(centroids).index_add_(0, assign, sample)
            filled = torch.bincount(assign, minlength=nlist) > 0  # an empty bucket keeps its old centroid
            centroids[filled] = torch.nn.functional.normalize(sums[filled], dim=1)
        assign = torch.cat([(chunk @ centroids.T).argmax(dim=1) for chunk in vectors.split(self.CHUNK)])
        self.centroids = centroids
        self.lists = [torch.nonzero(assign == c).flatten() for c in range(nlist)]

    def candidates(self, query: torch.Tensor, nprobe: int) -> torch.Tensor:
        nearest = (self.centroids @ query).topk(min(nprobe, len(self.lists))).indices
        return torch.cat([self.lists[int(c)] for c in nearest])


@dataclass
class ItemIndex:
    """The catalogue of one version and its per-task vectors, searched by cosine similarity."""

    item_ids: list[str]
    titles: list[str]
    texts: list[str]
    vectors: dict[str, torch.Tensor]
    search_config: SearchConfig
    ivf: dict[str, IVF]

    @classmethod
    def load(cls, version_dir: str, search: SearchConfig) -> ItemIndex:
        table = pq.read_table(Path(version_dir) / ITEMS_FILE).to_pydict()
        vectors = {
            task: torch.from_numpy(np.load(Path(version_dir) / vectors_file(task), allow_pickle=False))
            for task in EMBEDDING_TASKS
        }
        ivf = {}
        if search.kind is SearchKind.IVF:
            nlist = search.nlist or math.isqrt(len(table["item_id"])) or 1
            ivf = {task: IVF(v, nlist, search.seed) for task, v in vectors.items()}
        return cls(table["item_id"], table["title"], table["text"], vectors, search, ivf)

    def __post_init__(self) -> None:
        self.position = {item: i for i, item in enumerate(self.item_ids)}

    def score(self, task: str, query: np.ndarray, positions: Sequence[int]) -> np.ndarray:
        """Cosine score of each item at ``positions`` (exact; the rows of a candidate list only)."""
        q = torch.from_numpy(np.asarray(query, dtype=np.float32))
        return (self.vectors[task][torch.tensor(list(positions))] @ q).numpy()

    def search(self, task: str, query: np.ndarray, k: int, exclude: Sequence[int] = ()) -> list[Hit]:
        """Top ``k`` (position, cosine score), best first, never returning positions in ``exclude``."""
        q = torch.from_numpy(np.asarray(query, dtype=np.float32))
        vectors = self.vectors[task]
        if task in self.ivf:
            positions = self.ivf[task].candidates(q, self.search_config.nprobe)
            scores = vectors[positions] @ q  # the probed lists only: a small gather
            if exclude:
                scores[torch.isin(positions, torch.tensor(list(exclude)))] = -math.inf
        else:
            positions = None  # exact: score the matrix in place; gathering every row would copy all of it
            scores = vectors @ q
            if exclude:
                scores[torch.tensor(list(exclude))] = -math.inf
        top = scores.topk(min(k, scores.shape[0]))
        return [(int(i if positions is None else positions[i]), float(s))
                for i, s in zip(top.indices, top.values, strict=True) if s != -math.inf]  # fmt: skip

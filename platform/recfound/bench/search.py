"""Item search as the Model deployment runs it: exact against faiss IVF on synthetic catalogues of growing size.

Items and queries are unit vectors drawn from one seeded Gaussian mixture (``clusters`` centres, ``spread`` the
per-dimension noise relative to a centre's), so the catalogue has the neighbourhood structure IVF relies on; the
queries are fresh draws, not catalogue items. Both sides run ``serving.index`` search objects one query at a time
(a /v1/recommend call), with ``exclude`` random positions excluded per query as a user's history is, so the
figures are serving's: exact is the in-place matrix-vector product, ivf the index ``SearchKind.AUTO`` switches to.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import Field

from recfound.bench.common import Report, Table, fmt, interleaved, median
from recfound.config import Config
from recfound.serving.index import ExactSearch, IVFSearch, Search, SearchConfig


class SearchBench(Config):
    """Exact vs faiss IVF item search per catalogue size: ms/query, recall@k of ivf against exact, build time."""

    sizes: list[int] = [10_000, 100_000, 1_000_000]
    """Catalogue sizes (items)."""
    dim: int = Field(64, ge=2)
    """Embedding dimension."""
    nprobe: list[int] = [8, 32]
    """IVF lists scanned per query, one ivf column each."""
    nlist: int | None = Field(None, ge=1)
    """IVF lists; default serving's (sqrt(items), at most items/39)."""
    k: int = Field(10, ge=1)
    """Neighbours per query; recall@k is the share of exact's top k that ivf returns."""
    exclude: int = Field(20, ge=0)
    """Random positions excluded per query (a user's history, as /v1/recommend excludes it)."""
    queries: int = Field(200, ge=1)
    """Queries per size, timed one at a time."""
    rounds: int = Field(3, ge=1)
    """Timing rounds; each runs every query through every search, in rotating order."""
    clusters: int = Field(256, ge=1)
    """Gaussian mixture centres the items and queries are drawn around."""
    spread: float = Field(1.5, gt=0)
    """Per-dimension noise around a centre, relative to the centres' own spread: higher blurs the clusters and
    lowers IVF recall (1.0: recall@10 ~1 at nprobe 8; 2.0: ~0.5)."""
    seed: int = 0
    """Seed of the mixture, the queries, the exclusions and IVF's k-means."""


def mixture(n: int, dim: int, clusters: int, spread: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` float32 unit vectors around ``clusters`` centres (the centres come first from ``rng``)."""
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65536):  # chunks: no (n, dim) float64 temporaries at 1M
        rows = slice(start, min(n, start + 65536))
        out[rows] = centres[rng.integers(0, clusters, rows.stop - start)]
        out[rows] += spread * rng.standard_normal((rows.stop - start, dim), dtype=np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _run_all(search: Search, queries: np.ndarray, k: int, exclude: np.ndarray) -> Callable[[], list[list[int]]]:
    return lambda: [[p for p, _ in search.search(q, k, e.tolist())] for q, e in zip(queries, exclude, strict=True)]


def _recall(found: list[list[int]], truth: list[list[int]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True) if t]))


def measure(bench: SearchBench, n: int) -> dict[str, Any]:
    """One catalogue size: build both searches, recall of each ivf column, interleaved ms/query."""
    rng = np.random.default_rng([bench.seed, n])
    draws = mixture(n + bench.queries, bench.dim, bench.clusters, bench.spread, rng)
    items, queries = draws[:n], draws[n:]
    exclude = rng.integers(0, n, (bench.queries, min(bench.exclude, n - 1)))
    start = time.perf_counter()
    ivf = IVFSearch(items, bench.nlist, bench.nprobe[0], bench.seed)
    build_s = time.perf_counter() - start
    exact = _run_all(ExactSearch(items), queries, bench.k, exclude)
    truth, recall, cases = exact(), {}, {"exact": exact}
    for nprobe in bench.nprobe:
        probed = copy.copy(ivf)  # shares the faiss index: another nprobe without a second build
        probed.nprobe = nprobe
        cases[f"ivf{nprobe}"] = _run_all(probed, queries, bench.k, exclude)
        recall[nprobe] = _recall(cases[f"ivf{nprobe}"](), truth)
    timing = interleaved(cases, bench.rounds)
    ms = {name: median(times) * 1e3 / bench.queries for name, times in timing.wall.items()}
    return {
        "items": n,
        "nlist": ivf.nlist,
        "ivf_build_s": build_s,
        "ms_per_query": ms,
        "recall": {str(p): r for p, r in recall.items()},
    }


def run(bench: SearchBench) -> Report:
    sizes = [measure(bench, n) for n in bench.sizes]
    headers = [
        "items",
        "nlist",
        "exact ms/q",
        *(f"ivf nprobe={p} ms/q" for p in bench.nprobe),
        *(f"recall@{bench.k} nprobe={p}" for p in bench.nprobe),
        *(f"exact/ivf{p}" for p in bench.nprobe),
        "ivf build s",
    ]
    rows, ratios = [], {}
    for s in sizes:
        ms = s["ms_per_query"]
        speedups = [ms["exact"] / ms[f"ivf{p}"] for p in bench.nprobe]
        ratios |= {f"exact_vs_ivf{p}_{s['items']}": r for p, r in zip(bench.nprobe, speedups, strict=True)}
        rows.append(
            [
                f"{s['items']:,}",
                str(s["nlist"]),
                fmt(ms["exact"]),
                *(fmt(ms[f"ivf{p}"]) for p in bench.nprobe),
                *(f"{s['recall'][str(p)]:.3f}" for p in bench.nprobe),
                *(fmt(r) + "x" for r in speedups),
                fmt(s["ivf_build_s"]),
            ]
        )
    title = f"Item search, {bench.dim} dims, one query at a time, {bench.exclude} excluded per query"
    report = Report("search", bench.model_dump(mode="json"), ratios, {"sizes": sizes}, [Table(title, headers, rows)])
    report.notes = [
        (
            f"Median over {bench.rounds} rounds of {bench.queries} queries each (wall clock). Recall@{bench.k}: the "
            f"share of exact search's top {bench.k} that ivf returns. Mixture: {bench.clusters} centres, spread "
            f"{bench.spread}. ivf build = faiss k-means training + adding every item, once per task when a replica "
            f"loads a version; SearchConfig.kind=auto switches to ivf from ivf_min_items = "
            f"{SearchConfig().ivf_min_items:,} items."
        )
    ]
    return report

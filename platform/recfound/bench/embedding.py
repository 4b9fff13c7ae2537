"""What the embedding benchmarks (early exit, compact export) share: their options, the tasks they score, the rows
and catalogue texts they sample.

Both time catalogue texts embedded in interleaved rounds and score the evaluation job's pool protocol on a seeded
sample of a split's rows, so their options and samples are defined once here and the two stay comparable.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from recfound.config import CommaList, Config
from recfound.data.rows import Split
from recfound.eval.runner import Dataset, EmbeddingTask
from recfound.eval.systems import item_texts
from recfound.tasks import EMBEDDING_TASKS


class EmbeddingBench(Config):
    """Options of a benchmark that times catalogue embeddings and scores the pool protocol per embedding task."""

    data: str
    """The built dataset directory (jobs/build_dataset.py out)."""
    tasks: CommaList[str] = []
    """Embedding tasks to score (comma list of u2i, q2i, i2i); empty: those the split and the model both have."""
    split: Split = "valid"
    """Split the metrics are taken on: valid is the dev slice (model selection), test the reported one."""
    rows: int = Field(200, ge=1)
    """Queries per task for the metrics: a seeded sample of the split's rows (all when fewer)."""
    texts: int = Field(64, ge=1)
    """Catalogue texts embedded per timed round by each variant measured."""
    batch_size: int = Field(16, ge=1)
    """Texts per forward pass, timing and metrics alike."""
    rounds: int = Field(5, ge=1)
    """Timed rounds; each embeds the texts once with every variant measured, in rotating order."""
    warmup: int = Field(1, ge=0)
    """Untimed rounds first (allocator, folded-weight cache, onnxruntime's first-run graph work)."""
    threads: int = Field(1, ge=1)
    """Intra-op threads of torch (and onnxruntime) on a CPU (a serving replica's OMP_NUM_THREADS); ignored for GPU
    kernels."""
    seed: int = 42
    """Seeds the row and text samples and the pools' negatives (the evaluation job's 42)."""


def bench_tasks(asked: list[str], split: str, data: Dataset, adapter_tasks: list[str]) -> list[str]:
    """The embedding tasks to score: the asked ones, each checked, or every one the split and the model have."""
    usable = [t for t in EMBEDDING_TASKS if data.count(t, split) > 0 and t in adapter_tasks]
    wrong = [t for t in asked if t not in usable]
    if wrong:
        raise ValueError(
            f"tasks: {', '.join(wrong)} cannot be scored (embedding tasks with {split} rows in {data.root} "
            f"that the model has: {', '.join(usable) or 'none'})"
        )
    if not (asked or usable):
        raise ValueError(f"no embedding task has {split} rows in {data.root} and an adapter route")
    return asked or usable


def sample_rows(prepared: EmbeddingTask, n: int, seed: int) -> EmbeddingTask:
    """``n`` seeded queries of a prepared task (in their file order), with their positives and exclusions."""
    if len(prepared.rows) <= n:
        return prepared
    keep = np.sort(np.random.default_rng(seed).choice(len(prepared.rows), n, replace=False))
    return EmbeddingTask(
        prepared.rows.iloc[keep].reset_index(drop=True),
        [prepared.positives[i] for i in keep],
        prepared.candidates,
        [prepared.exclude[i] for i in keep],
    )


def sample_texts(bench: EmbeddingBench, data: Dataset) -> list[str]:
    """``bench.texts`` seeded catalogue texts (all when fewer): what every variant embeds in each timed round."""
    texts = item_texts(data.items)
    picked = np.random.default_rng(bench.seed).choice(len(texts), min(bench.texts, len(texts)), replace=False)
    return [texts[i] for i in picked]

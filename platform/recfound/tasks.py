"""The RecFound task set and the on-disk layout of a built dataset: the contract between data, model and training.

Task names are a public contract (CLI, manifest, serving model names); ids are the row of the TMoLE task table
and follow the paper's released code (0-2 embedding, 3-12 generative; later tasks are appended), so a checkpoint's
routing is stable.
"""

from __future__ import annotations

from enum import Enum


class Mode(str, Enum):
    """How a task trains: contrastive on pooled hidden states, or causal-LM on the response."""

    EMBEDDING = "embedding"
    GENERATIVE = "generative"


EMBEDDING_TASKS: tuple[str, ...] = ("u2i", "q2i", "i2i")
GENERATIVE_TASKS: tuple[str, ...] = (
    "query_rewriting",
    "sequential_recommendation",
    "product_relation_prediction",
    "sentiment_analysis",
    "attribute_value_extraction",
    "product_matching",
    "user_profile",
    "item_profile",
    "answerability_prediction",
    "answer_generation",
    "explanation_generation",
    "candidate_ranking",
)
ALL_TASKS: tuple[str, ...] = EMBEDDING_TASKS + GENERATIVE_TASKS
TASK_ID: dict[str, int] = {name: i for i, name in enumerate(ALL_TASKS)}
SPLITS: tuple[str, ...] = ("train", "valid", "test")


def mode_of(task: str) -> Mode:
    if task in EMBEDDING_TASKS:
        return Mode.EMBEDDING
    if task in GENERATIVE_TASKS:
        return Mode.GENERATIVE
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(ALL_TASKS)}")


# Built dataset layout, relative to the dataset directory.
DATASET_MANIFEST = "manifest.json"
"""Row counts per task and split, sources with their SHA-256, skipped tasks and why (written last by the builder)."""
ITEMS = "items.parquet"
INTERACTIONS = "interactions.parquet"
QUARANTINE = "quarantine.jsonl"


def task_path(task: str, split: str) -> str:
    return f"tasks/{task}/{split}.parquet"


# Parquet columns of each task mode. Embedding rows: a query side and an item side, each an (instruction, text)
# pair, plus hard negatives; item ids let evaluation and serving map texts back to the catalogue. ``query_item``
# is the i2i anchor's id (empty for u2i/q2i), so evaluation can leave the anchor out of its own ranking.
EMBEDDING_COLUMNS: tuple[str, ...] = (
    "id",
    "task",
    "query_instruction",
    "query",
    "query_item",
    "pos_instruction",
    "pos",
    "pos_item",
    "neg",
    "neg_items",
    "user",
    "category",
    "source",
)
GENERATIVE_COLUMNS: tuple[str, ...] = ("id", "task", "prompt", "response", "user", "item", "source")
ITEM_COLUMNS: tuple[str, ...] = ("item_id", "title", "text", "category", "brand")
INTERACTION_COLUMNS: tuple[str, ...] = ("user", "item", "timestamp", "rating", "split")

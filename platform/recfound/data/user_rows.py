"""The per-user tasks' rows, templated in Ray tasks: the build's largest stage runs on every core of the cluster.

Each task gets a chunk of whole users (``chunks.in_order``), splits every user's timeline and templates that user's
rows of each per-user task; the driver writes the results in input order, so rows and ids are those of one pass over
the users. Rows depend on (seed, user, position) only (``Context.rng``), never on which worker or chunk made them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import pyarrow as pa
import ray

from recfound.data.behaviour import Behaviour
from recfound.data.chunks import Shared, in_order
from recfound.data.context import Context
from recfound.data.embedding_tasks import q2i_rows, u2i_rows
from recfound.data.generative_tasks import (
    candidate_ranking_rows,
    explanation_generation_rows,
    sentiment_analysis_rows,
    sequential_recommendation_rows,
    user_profile_rows,
)
from recfound.data.memory import release_unused
from recfound.data.rows import Sample
from recfound.data.split import Timeline, user_timelines
from recfound.data.tables import INTERACTION_SCHEMA, SCHEMAS, interaction_row, row_columns
from recfound.tasks import SPLITS, mode_of

USER_BUILDERS: dict[str, Callable[[Context, str, Timeline], list[Sample]]] = {
    "u2i": u2i_rows,
    "q2i": q2i_rows,
    "sequential_recommendation": sequential_recommendation_rows,
    "sentiment_analysis": sentiment_analysis_rows,
    "user_profile": user_profile_rows,
    "explanation_generation": explanation_generation_rows,
    "candidate_ranking": candidate_ranking_rows,
}
"""Tasks templated from one user's timeline at a time."""
BODIES = {mode: pa.schema(list(schema)[1:]) for mode, schema in SCHEMAS.items()}
"""A task row's columns without its id: ids number the rows of a split file, which only the writing driver knows."""

Templated = tuple[pa.Table, dict[str, dict[str, pa.Table]]]
"""A chunk's interactions and, per task and split, its rows (without ids)."""


def template_chunk(ctx: Context, chunk: pa.Table, tasks: Sequence[str]) -> Templated:
    """Every user's interactions and rows of ``tasks`` in ``chunk`` (whole users, users ascending), as tables."""
    interactions: list[dict[str, Any]] = []
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {task: {split: [] for split in SPLITS} for task in tasks}
    for user, timeline in user_timelines([chunk]):
        interactions += [interaction_row(user, split, event) for split, event in timeline]
        for task in tasks:
            for split, row in USER_BUILDERS[task](ctx, user, timeline):
                rows[task][split].append(row_columns(task, row))
    tables = {
        task: {split: pa.Table.from_pylist(r, schema=BODIES[mode_of(task)]) for split, r in splits.items() if r}
        for task, splits in rows.items()
    }
    return pa.Table.from_pylist(interactions, schema=INTERACTION_SCHEMA), tables


@ray.remote
def _template(chunk: pa.Table, ctx: Shared, tasks: Sequence[str]) -> Templated:
    templated = template_chunk(ctx.get(), chunk, tasks)
    release_unused()  # the chunk's Python rows are freed: a worker that keeps their pages holds them all pass long
    return templated


UNREAD: dict[str, Any] = {"categories": (), "description": "", "features": (), "also_buy": (), "also_view": ()}
"""The item fields no per-user template reads, blanked in the workers' catalogue: descriptions, features and related
lists are most of a catalogue's bytes, and every worker holds a copy (a templating worker of a 4M-review synthetic
build: ~610 MiB PSS with the whole catalogue, ~460 with this)."""


def templated(ctx: Context, blocks: Iterable[pa.Table], tasks: Sequence[str]) -> Iterator[Templated]:
    """Each chunk of whole users templated by a Ray task, in input order. The cross-user facts (behaviour,
    judgements, questions) stay on the driver, where the tasks that read them are built: they grow with the input
    and no per-user template needs them; nor the item fields in ``UNREAD``."""
    catalogue = {key: replace(item, **UNREAD) for key, item in ctx.catalogue.items()}
    shared = Shared(replace(ctx, catalogue=catalogue, behaviour=Behaviour(), judgements=(), questions=()))
    return in_order(_template, blocks, shared, list(tasks))

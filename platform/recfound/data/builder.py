"""Raw sources -> the multi-task dataset: ``tasks/<task>/<split>.parquet``, items, interactions, manifest.

Tasks read from users' timelines are templated by Ray tasks, a chunk of whole users each, as the kept reviews stream
from Ray Data (``user_rows``); the driver writes their rows in input order (``tables.TaskFiles``); the other tasks
(items, queries, questions, relations) are built and written one task at a time. The manifest is written last and
atomically: a directory without one is a build that did not finish.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from pydantic import Field, field_validator, model_validator

from recfound import __version__
from recfound.config import CommaList, Config, InputFiles
from recfound.data.behaviour import generic_summaries
from recfound.data.context import Context
from recfound.data.embedding_tasks import build_i2i, build_q2i, q2i_mode
from recfound.data.generative_tasks import build_query_rewriting
from recfound.data.gritlm import SPLIT_PLACEHOLDER, gritlm_urls, read_gritlm
from recfound.data.item_tasks import (
    build_attribute_value_extraction,
    build_item_profile,
    build_product_matching,
    build_product_relation_prediction,
)
from recfound.data.loading import Loaded, load
from recfound.data.memory import release_unused
from recfound.data.qa import build_answer_generation, build_answerability_prediction, qa_counts
from recfound.data.reading import local_ray, pipeline_context
from recfound.data.rows import Sample, TaskUnavailable
from recfound.data.sources import BadRowPolicy, BadRows, DataError
from recfound.data.synthetic import SyntheticConfig, write_catalogue
from recfound.data.tables import (
    INTERACTION_SCHEMA,
    ITEM_SCHEMA,
    ParquetStream,
    TaskFiles,
    item_columns,
    write_parquet,
)
from recfound.data.templates import TEMPLATE_VERSION
from recfound.data.user_rows import USER_BUILDERS, templated
from recfound.io import exists, expand, sha256, write_json
from recfound.tasks import ALL_TASKS, DATASET_MANIFEST, INTERACTIONS, ITEMS, QUARANTINE, SPLITS

log = logging.getLogger(__name__)

BUILDERS: dict[str, Callable[[Context], Iterable[Sample]]] = {
    "q2i": build_q2i,
    "i2i": build_i2i,
    "query_rewriting": build_query_rewriting,
    "product_relation_prediction": build_product_relation_prediction,
    "attribute_value_extraction": build_attribute_value_extraction,
    "product_matching": build_product_matching,
    "item_profile": build_item_profile,
    "answerability_prediction": build_answerability_prediction,
    "answer_generation": build_answer_generation,
}
"""Tasks built from the catalogue, queries, questions and what crosses users (q2i: from a query log), one task at a
time; i2i, whose rows grow with the reviews, yields them one at a time."""
assert set(BUILDERS) | set(USER_BUILDERS) == set(ALL_TASKS)


class BuildConfig(Config):
    reviews: InputFiles | None = None
    """Amazon reviews, JSON lines (gzip ok; 2018 or 2023 schema, detected per file). Like meta, queries and qa: a
    file, a directory (its *.json, *.json.gz, *.jsonl, *.jsonl.gz files), a glob (s3://b/reviews/*.json.gz) or a
    comma list of these, read in sorted order as one file; a part matching nothing is an error. Unset (and no
    gritlm): a synthetic catalogue is generated under <out>/raw/ and built from."""
    meta: InputFiles | None = None
    """Amazon item metadata for the reviewed items (2018 or 2023 schema); a repeated item id keeps its first row,
    across files too. Without it items are titled by review summaries and the item-level generative tasks are
    skipped."""
    queries: InputFiles | None = None
    """Shopping Queries (ESCI) judgements: parquet, CSV or JSON lines with query, product_id, esci_label
    [, product_title, product_brand], or an OpenSearch judgement-list JSON (format detected per file; name
    parquet or CSV files by glob, a directory contributes JSON files only). Used by q2i and query_rewriting."""
    qa: InputFiles | None = None
    """Amazon product question answering: McAuley's QA dumps (Python dict literal lines, single- or multi-answer)
    or AmazonQA's JSON lines. Builds answer_generation from every answered question, and answerability_prediction
    where the file labels answerability (AmazonQA); product text and reviews are added where the product is in
    the reviews' catalogue."""
    gritlm: str | None = None
    """Published RecFound (GritLM) JSON lines, added to the rows built from reviews. With '{split}' in the URL
    the train/valid/test files keep their split; a single file is split by a seeded hash of each row's id."""
    out: str = "runs/data/synthetic"
    """Output directory (local path or fsspec URL)."""
    seed: int = 0
    """Seed for negatives, option order, paraphrases and hash splits: same inputs and seed, identical files."""
    tasks: CommaList[str] | None = None
    """Tasks to build (comma list). Unset: every task the sources support; the others are skipped with the
    reason in the manifest. A listed task that cannot be built is an error. Names: u2i, q2i, i2i,
    query_rewriting, sequential_recommendation, product_relation_prediction, sentiment_analysis,
    attribute_value_extraction, product_matching, user_profile, item_profile, answerability_prediction,
    answer_generation, explanation_generation, candidate_ranking."""
    kcore: int = Field(5, ge=1)
    """Keep only users and items with at least this many interactions (iterated; the real slices are 5-core)."""
    num_negatives: int = Field(1, ge=1)
    """Hard negatives per embedding row (the paper uses 1)."""
    max_history: int = Field(20, ge=1)
    """Most recent items shown as a user's history (u2i, sequential_recommendation, candidate_ranking,
    user_profile, explanation_generation)."""
    sr_options: int = Field(10, ge=2, le=20)
    """Lettered options per sequential_recommendation prompt: the next item plus sampled negatives."""
    holdout: float = Field(0.1, gt=0, lt=0.5)
    """Fraction of item-level and query rows hashed into test, and again into valid."""
    on_bad_rows: BadRowPolicy = "error"
    """error: stop at the first malformed input row; skip: count it and write it to <out>/quarantine.jsonl."""
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    """With on_bad_rows=skip, the largest share of one file's rows that may be malformed before the build stops
    (the quarantine is still written). Higher salvages more of a damaged dump, but lets a wrong or badly
    broken file pass as data; 1 never stops, 0 stops at any bad row after listing them all."""
    max_rows_per_task: int | None = Field(None, ge=1)
    """Cap on the rows of each split of each task (a seeded sample), for quick experiments."""
    object_store_mib: int | None = Field(1024, ge=75)
    """MiB of shared memory for the object store of the local Ray a build starts for itself (ignored when it
    joins a running Ray or cluster, whose nodes set their own). The kept reviews and the shuffles live there, and
    Ray Data sizes its in-flight blocks by it, so the cap keeps a build's memory from following the machine's size;
    past it Ray spills objects to local disk (bounded memory, disk I/O). Measured on synthetic dumps (2 cores):
    nothing spilled up to 1M reviews, peak PSS 1,944 vs 1,931 MiB at 250k and 3,981 vs 4,221 MiB at 1M against
    Ray's default. Unset: Ray's default, 30 % of the machine's memory."""
    synthetic: SyntheticConfig = SyntheticConfig()
    """The generated catalogue, used only when neither reviews nor gritlm is given."""

    @field_validator("gritlm")
    @classmethod
    def _gritlm_exists(cls, url: str | None) -> str | None:
        if url is not None and not (gritlm_urls(url) or exists(url)):
            raise ValueError(f"no such file: {url}" + (" for any split" if SPLIT_PLACEHOLDER in url else ""))
        return url

    @model_validator(mode="after")
    def _needs_reviews(self) -> BuildConfig:
        if self.reviews is None and (self.meta or self.queries or self.qa):
            raise ValueError("meta, queries and qa describe the items of a reviews file: set reviews too")
        return self


def _requested(tasks: list[str] | None) -> list[str] | None:
    unknown = [t for t in tasks or [] if t not in ALL_TASKS]
    if unknown:
        raise DataError("tasks", f"unknown task {unknown[0]!r}; known tasks: {', '.join(ALL_TASKS)}")
    return list(dict.fromkeys(tasks)) if tasks else None


def _clear(out: str) -> None:
    """Remove what a previous build left (manifest first), so stale task files never pass for new ones."""
    fs, root = url_to_fs(out)
    for name in (DATASET_MANIFEST, "tasks", ITEMS, INTERACTIONS, QUARANTINE):
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}", recursive=True)


def _inputs(cfg: BuildConfig) -> dict[str, list[str]]:
    """The files of each given source, expanded once so that reading and the manifest see the same list."""
    specs = {"reviews": cfg.reviews, "meta": cfg.meta, "queries": cfg.queries, "qa": cfg.qa}
    return {role: expand(spec) for role, spec in specs.items() if spec}


def _sources(cfg: BuildConfig, urls: dict[str, list[str]]) -> list[dict[str, str]]:
    """One entry per file read, in reading order: a role given as shards lists every shard with its checksum."""
    files = [(role, url) for role, role_urls in urls.items() for url in role_urls]
    if cfg.gritlm:
        files += [("gritlm", url) for url in (gritlm_urls(cfg.gritlm) or {"": cfg.gritlm}).values()]
    return [{"role": role, "url": url, "sha256": sha256(url)} for role, url in files]


@dataclass
class Written:
    """What writing the task tables leaves for the item table and the manifest, once their rows are gone."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """Rows per task and split."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Why each task was left out."""
    texts: dict[str, str] = field(default_factory=dict)
    """Item id -> text of every item an embedding row names that the catalogue lacks (GritLM rows name items only
    by their text)."""


def _write_user_rows(loaded: Loaded, ctx: Context, files: dict[str, TaskFiles], out: str) -> None:
    """One pass over the kept reviews: Ray tasks template chunks of whole users (``user_rows``) and the driver
    writes their interactions and rows of every per-user task in input order, so it holds a few chunks' tables and
    a row group per open file."""
    interactions = ParquetStream(f"{out}/{INTERACTIONS}", INTERACTION_SCHEMA)
    tasks = [task for task in files if task in USER_BUILDERS]
    blocks = loaded.reviews.iter_batches(batch_format="pyarrow", batch_size=None)
    for events, rows in templated(ctx, blocks, tasks):
        interactions.add_table(events)
        for task, splits in rows.items():
            for split, table in splits.items():
                files[task].add_table(split, table)
        release_unused()  # the chunk's tables, fetched and copied, are freed: hand their pages back
    interactions.close()


def _write_tasks(
    requested: list[str] | None,
    loaded: Loaded | None,
    ctx: Context | None,
    extra: dict[str, list[Sample]],
    cfg: BuildConfig,
    out: str,
) -> Written:
    """Stream the per-user tasks' rows, then build each other task and write it before the next is built, so a
    build holds one such task's rows at a time (their sum grows with the dump); the reason for each task left out
    is kept (an error if it was asked for)."""
    known = ctx.catalogue if ctx is not None else {}
    files = {task: TaskFiles(out, task, cfg.max_rows_per_task, cfg.seed, known) for task in requested or ALL_TASKS}
    if loaded is not None and ctx is not None:
        _write_user_rows(loaded, ctx, files, out)
    else:
        ParquetStream(f"{out}/{INTERACTIONS}", INTERACTION_SCHEMA).close()
    written = Written()
    for task, task_files in files.items():
        reason = "no reviews given and no gritlm= rows for it"
        if ctx is not None:
            reason = "the sources yield no rows for it"
            try:
                for split, row in BUILDERS[task](ctx) if task in BUILDERS else ():
                    task_files.add(split, row)
            except TaskUnavailable as why:
                reason = str(why)
        for split, row in extra.get(task, []):
            task_files.add(split, row)
        counts = task_files.close()
        if not counts:
            if requested:
                raise DataError("tasks", f"task {task!r} was requested but cannot be built: {reason}")
            log.info("skipping %s: %s", task, reason)
            written.skipped[task] = reason
            continue
        written.counts[task] = counts
        written.texts.update(task_files.texts)
    return written


def _write_quarantine(bad: BadRows) -> None:
    """Under ``skip``, one JSON line per malformed row (file, line, field, reason); an empty file when none."""
    if bad.policy == "skip":
        fs, path = url_to_fs(bad.quarantine)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # reading may fail before any output exists
        with fsspec.open(bad.quarantine, "w") as handle:
            handle.writelines(json.dumps(row, sort_keys=True) + "\n" for row in bad.rows)


def _context(cfg: BuildConfig, loaded: Loaded | None, synthetic: bool) -> Context | None:
    if loaded is None:
        return None
    ctx = Context(
        seed=cfg.seed,
        catalogue=loaded.catalogue,
        behaviour=loaded.behaviour,
        judgements=loaded.judgements,
        questions=loaded.questions,
        source="synthetic" if synthetic else "amazon_reviews",
        num_negatives=cfg.num_negatives,
        max_history=cfg.max_history,
        sr_options=cfg.sr_options,
        holdout=cfg.holdout,
    )
    if q2i_mode(ctx)[0]:  # only pseudo-queries need the generic summaries: a Ray pass over every review
        ctx.pseudo_queries, ctx.generic_summaries = True, generic_summaries(loaded.reviews)
    return ctx


def build(cfg: BuildConfig) -> dict[str, Any]:
    """Build every requested (or every possible) task from the configured sources; returns the manifest."""
    requested = _requested(cfg.tasks)
    out = cfg.out.rstrip("/")
    _clear(out)
    bad = BadRows(cfg.on_bad_rows, cfg.max_bad_fraction, f"{out}/{QUARANTINE}")
    synthetic = cfg.reviews is None and cfg.gritlm is None
    if synthetic:
        urls = {role: [url] for role, url in write_catalogue(cfg.synthetic, f"{out}/raw").items()}
    else:
        urls = _inputs(cfg)
    try:
        store = None if cfg.object_store_mib is None else cfg.object_store_mib * 2**20
        with local_ray(store) if urls else contextlib.nullcontext(), pipeline_context():
            loaded = load(urls, bad, cfg.kcore) if urls else None
            extra = read_gritlm(cfg.gritlm, bad, cfg.seed, cfg.holdout) if cfg.gritlm else {}
            ctx = _context(cfg, loaded, synthetic)
            written = _write_tasks(requested, loaded, ctx, extra, cfg, out)
    finally:  # also when reading fails: the rows that stopped the build are the ones to look at
        _write_quarantine(bad)
    if not written.counts:
        raise DataError(out, "no task could be built from the given sources: " + json.dumps(written.skipped))
    catalogue = ctx.catalogue if ctx else {}
    write_parquet(f"{out}/{ITEMS}", item_columns(catalogue, written.texts), ITEM_SCHEMA)

    counts = written.counts
    manifest: dict[str, Any] = {
        "tasks": counts,
        "rows": {split: sum(c[split] for c in counts.values()) for split in SPLITS},
        "items": len(set(catalogue) | set(written.texts)),
        "users": loaded.behaviour.users if loaded else 0,
        "interactions": loaded.behaviour.interactions if loaded else 0,
        "sources": _sources(cfg, urls),
        "synthetic": synthetic,
        "seed": cfg.seed,
        "config": cfg.model_dump(mode="json"),
        "template_version": TEMPLATE_VERSION,
        "skipped_tasks": written.skipped,
        "quarantined": {"total": len(bad.rows), "by_file": bad.counts(), "policy": cfg.on_bad_rows},
        "filtered": loaded.counts if loaded else {},
        "recfound_version": __version__,
    }
    if "q2i" in counts and ctx is not None:
        pseudo, why = q2i_mode(ctx)
        manifest["q2i"] = {"pseudo_queries": pseudo, "reason": why}
    if ctx is not None and ctx.questions:
        manifest["qa"] = qa_counts(ctx)
    write_json(f"{out}/{DATASET_MANIFEST}", manifest)  # last: its presence marks a finished build
    return manifest

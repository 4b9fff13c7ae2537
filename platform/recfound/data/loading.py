"""Raw files -> the split user timelines and the catalogue every task builder reads.

Reviews and metadata go through Ray Data (parallel streaming reads, de-duplication, k-core and the per-user split
as group-bys); what comes back to the driver is the k-core's timelines and the metadata of reviewed items, the
context the task templates sample from (negatives, histories, relations), which they need whole.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.compute as pc

from recfound.data.catalogue import CatalogueItem, build_catalogue, variant_aliases
from recfound.data.esci import QueryJudgement, read_queries
from recfound.data.qa import Question, read_qa
from recfound.data.reading import ORDER, item, partitions, ray_errors, read_role
from recfound.data.sources import BadRows, DataError, Item, named
from recfound.data.split import Timeline, dedupe, kcore, leave_last_out, timelines


@dataclass
class Loaded:
    catalogue: dict[str, CatalogueItem]
    timelines: dict[str, Timeline]
    judgements: list[QueryJudgement]
    questions: list[Question] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    """What was dropped or merged on the way, for the manifest: nothing disappears unrecorded."""


def _first_row(group: pa.Table) -> pa.Table:
    return group.sort_by(ORDER).slice(0, 1)


def _among(batch: pa.Table, ids: pa.Array) -> pa.Table:
    return batch.filter(pc.is_in(batch["item_id"], ids))


def _unique_items(batch: pa.Table) -> pa.Table:
    return pa.table({"item": pc.unique(batch["item"])})


def _read_meta(files: Sequence[str], bad: BadRows, reviewed: list[str]) -> tuple[dict[str, Item], int]:
    """The reviewed items' metadata (a repeated id keeps its first row in input order, across files too) and how
    many repeated rows the whole metadata held."""
    rows, count = read_role(files, "meta", bad)
    if not count:
        raise DataError(named(files), "no usable metadata rows")
    grouped = rows.groupby("item_id", num_partitions=partitions(count))
    unique = grouped.map_groups(_first_row, batch_format="pyarrow").materialize()
    wanted = unique.map_batches(_among, fn_kwargs={"ids": pa.array(reviewed)}, batch_format="pyarrow")
    return {row["item_id"]: item(row) for row in wanted.take_all()}, count - unique.count()


def _aliased(batch: pa.Table, aliases: Mapping[str, str]) -> pa.Table:
    items = [aliases.get(i, i) for i in batch["item"].to_pylist()]
    return batch.set_column(batch.schema.get_field_index("item"), "item", pa.array(items, pa.string()))


def load(urls: Mapping[str, Sequence[str]], bad: BadRows, min_interactions: int) -> Loaded:
    """Read reviews (plus meta, queries and qa when given), each role one or more files, merge item variants,
    dedupe, k-core, split."""
    with ray_errors():
        return _load(urls, bad, min_interactions)


def _load(urls: Mapping[str, Sequence[str]], bad: BadRows, min_interactions: int) -> Loaded:
    reviews, read = read_role(urls["reviews"], "reviews", bad)
    if not read:
        raise DataError(named(urls["reviews"]), "no usable review rows")
    items_of = reviews.map_batches(_unique_items, batch_format="pyarrow", batch_size=None)
    reviewed = sorted({row["item"] for row in items_of.take_all()})
    meta, repeats = _read_meta(urls["meta"], bad, reviewed) if urls.get("meta") else ({}, 0)
    judgements = read_queries(urls["queries"], bad) if urls.get("queries") else []
    questions = read_qa(urls["qa"], bad) if urls.get("qa") else []
    aliases = variant_aliases(reviewed, meta)
    questions = [replace(q, item=aliases.get(q.item, q.item)) for q in questions]
    aliased = reviews.map_batches(_aliased, fn_kwargs={"aliases": aliases}, batch_format="pyarrow")
    unique = dedupe(aliased, read).materialize()
    kept = kcore(unique, min_interactions)
    if not kept.count():
        raise DataError(
            named(urls["reviews"]), f"no interactions left after {min_interactions}-core filtering (lower kcore=)"
        )
    split = timelines(leave_last_out(kept, kept.count()))
    summaries: dict[str, list[str]] = defaultdict(list)
    for split_name, event in sorted((e for t in split.values() for e in t), key=lambda e: e[1].timestamp):
        if split_name == "train" and event.summary:
            summaries[event.item].append(event.summary)
    items = {e.item for t in split.values() for _, e in t}
    catalogue = build_catalogue(items, meta, summaries, judgements, aliases)
    counts = {
        "reviews_read": read,
        "merged_item_variants": len(aliases),
        "duplicate_interactions": read - unique.count(),
        "kcore_removed_interactions": unique.count() - kept.count(),
        "duplicate_meta_rows": repeats,
        "items_without_meta": sum(1 for i in items if i not in meta),
        "query_judgements": len(judgements),
    }
    return Loaded(catalogue, split, judgements, questions, counts)

"""Raw files -> the split user timelines and the catalogue every task builder reads.

Reviews and metadata go through Ray Data (parallel streaming reads; de-duplication and the k-core as group-bys,
``kcore.py``); what comes back to the driver is the k-core's timelines and the metadata of reviewed items, the
context the task templates sample from (negatives, histories, relations), which they need whole.

A build makes 6 + r Ray Data executions for a k-core found in r rounds (the last one drops nothing; the synthetic
default takes 4): the reviews' read, its side rows (bad rows, line counts, reviewed items), the metadata's read with
its side rows, de-duplication, the k-core's projection, the r rounds and the gathering of the kept reviews. 1 + r
of them shuffle.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from recfound.data.catalogue import CatalogueItem, build_catalogue, variant_aliases
from recfound.data.esci import QueryJudgement, read_queries
from recfound.data.kcore import dedupe, kcore_vertices, within
from recfound.data.qa import Question, read_qa
from recfound.data.reading import item, ray_errors, read_role, read_wanted, sort_shuffles
from recfound.data.sources import BadRows, DataError, Item, named
from recfound.data.split import Timeline, timelines


@dataclass
class Loaded:
    catalogue: dict[str, CatalogueItem]
    timelines: dict[str, Timeline]
    judgements: list[QueryJudgement]
    questions: list[Question] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    """What was dropped or merged on the way, for the manifest: nothing disappears unrecorded."""


def _read_meta(files: Sequence[str], bad: BadRows, reviewed: list[str]) -> tuple[dict[str, Item], int]:
    """The reviewed items' metadata (a repeated id keeps its first row in input order, across files too) and how
    many repeated rows the whole metadata held. Only the reviewed items' rows reach the driver, with each file's
    distinct ids for the count (short strings), and the repeats are resolved here: a group-by would shuffle the
    whole dump for them."""
    rows, count, ids = read_wanted(files, "meta", bad, reviewed)
    if not count:
        raise DataError(named(files), "no usable metadata rows")
    meta: dict[str, Item] = {}
    for row in sorted(rows, key=lambda r: (r["file_index"], r["line"])):
        meta.setdefault(row["item_id"], item(row))
    return meta, count - len(ids)


def load(urls: Mapping[str, Sequence[str]], bad: BadRows, min_interactions: int) -> Loaded:
    """Read reviews (plus meta, queries and qa when given), each role one or more files, merge item variants,
    dedupe, k-core, split."""
    with ray_errors(), sort_shuffles():
        return _load(urls, bad, min_interactions)


def _load(urls: Mapping[str, Sequence[str]], bad: BadRows, min_interactions: int) -> Loaded:
    reviews, read, reviewed = read_role(urls["reviews"], "reviews", bad)
    if not read:
        raise DataError(named(urls["reviews"]), "no usable review rows")
    meta, repeats = _read_meta(urls["meta"], bad, reviewed) if urls.get("meta") else ({}, 0)
    judgements = read_queries(urls["queries"], bad) if urls.get("queries") else []
    questions = read_qa(urls["qa"], bad) if urls.get("qa") else []
    aliases = variant_aliases(reviewed, meta)
    questions = [replace(q, item=aliases.get(q.item, q.item)) for q in questions]
    unique = dedupe(reviews, read, aliases)
    kept = within(unique, kcore_vertices(unique, min_interactions))
    split = timelines(kept.iter_batches(batch_format="pyarrow", batch_size=None))
    if not split:
        raise DataError(
            named(urls["reviews"]), f"no interactions left after {min_interactions}-core filtering (lower kcore=)"
        )
    kept_count = sum(len(t) for t in split.values())
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
        "kcore_removed_interactions": unique.count() - kept_count,
        "duplicate_meta_rows": repeats,
        "items_without_meta": sum(1 for i in items if i not in meta),
        "query_judgements": len(judgements),
    }
    return Loaded(catalogue, split, judgements, questions, counts)

"""Raw files -> the catalogue every task builder reads and the k-core's reviews, each user's rows together.

Reviews and metadata go through Ray Data (parallel streaming reads; de-duplication and the k-core as group-bys,
``kcore.py``). The driver never holds the kept reviews: it reads them twice in blocks (the de-duplication group-by
delivers each user's rows together, users ascending) and hands chunks of whole users to Ray tasks (``chunks.py``),
once here to gather what crosses users (``behaviour.py``) and once in the builder to template each user's rows
(``user_rows.py``); what the driver keeps is the metadata of reviewed items and the catalogue, which the templates
sample from whole (negatives, histories, relations).

A build makes 8 + r Ray Data executions for a k-core found in r rounds (the last one drops nothing; the synthetic
default takes 4): the reviews' read, its side rows (bad rows, line counts, reviewed items), the metadata's read with
its side rows, de-duplication, the k-core's projection, the r rounds, the kept reviews' filter (materialised: a
filter re-run per pass took 6 s of 2 cores at 100k reviews) and the two passes over them. 1 + r of them shuffle; one
more shuffle counts generic review summaries when q2i falls back to pseudo-queries. Run them under
``reading.pipeline_context``: the passes rely on its block order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import ray.data

from recfound.data.behaviour import Behaviour, gathered
from recfound.data.catalogue import CatalogueItem, build_catalogue, variant_aliases
from recfound.data.esci import QueryJudgement, read_queries
from recfound.data.kcore import dedupe, kcore_vertices, within
from recfound.data.memory import release_unused
from recfound.data.qa import Question, read_qa
from recfound.data.reading import item, ray_errors, read_role, read_wanted
from recfound.data.sources import BadRows, DataError, Item, named


@dataclass
class Loaded:
    catalogue: dict[str, CatalogueItem]
    reviews: ray.data.Dataset
    """The k-core's reviews, each user's rows together and users ascending, in blocks read in order."""
    behaviour: Behaviour
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
    with ray_errors():
        loaded = _load(urls, bad, min_interactions)
    release_unused()  # the metadata rows are freed once the catalogue holds what it keeps: before templating starts
    return loaded


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
    kept = within(unique, kcore_vertices(unique, min_interactions)).materialize()  # read twice: filtered once
    blocks = kept.iter_batches(batch_format="pyarrow", batch_size=None)
    behaviour = gathered(blocks, quoted={q.item for q in questions if not q.snippets})
    if not behaviour.users:
        raise DataError(
            named(urls["reviews"]), f"no interactions left after {min_interactions}-core filtering (lower kcore=)"
        )
    kept_count, items = behaviour.interactions, behaviour.items
    catalogue = build_catalogue(items, meta, behaviour.summaries(), judgements, aliases)
    counts = {
        "reviews_read": read,
        "merged_item_variants": len(aliases),
        "duplicate_interactions": read - unique.count(),
        "kcore_removed_interactions": unique.count() - kept_count,
        "duplicate_meta_rows": repeats,
        "items_without_meta": sum(1 for i in items if i not in meta),
        "query_judgements": len(judgements),
    }
    return Loaded(catalogue, kept, behaviour, judgements, questions, counts)

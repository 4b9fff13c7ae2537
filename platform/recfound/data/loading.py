"""Raw files -> the split user timelines and the catalogue every task builder reads."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from recfound.data.catalogue import CatalogueItem, build_catalogue, variant_aliases
from recfound.data.esci import QueryJudgement, read_queries
from recfound.data.qa import Question, read_qa
from recfound.data.sources import BadRows, DataError, named, read_meta, read_reviews
from recfound.data.split import Timeline, dedupe, kcore, leave_last_out


@dataclass
class Loaded:
    catalogue: dict[str, CatalogueItem]
    timelines: dict[str, Timeline]
    judgements: list[QueryJudgement]
    questions: list[Question] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    """What was dropped or merged on the way, for the manifest: nothing disappears unrecorded."""


def load(urls: Mapping[str, Sequence[str]], bad: BadRows, min_interactions: int) -> Loaded:
    """Read reviews (plus meta, queries and qa when given), each role one or more files, merge item variants,
    dedupe, k-core, split."""
    reviews = read_reviews(urls["reviews"], bad)
    meta, repeats = read_meta(urls["meta"], bad) if urls.get("meta") else ({}, 0)
    judgements = read_queries(urls["queries"], bad) if urls.get("queries") else []
    questions = read_qa(urls["qa"], bad) if urls.get("qa") else []
    aliases = variant_aliases((r.item for r in reviews), meta)
    questions = [replace(q, item=aliases.get(q.item, q.item)) for q in questions]
    unique, repeated = dedupe([replace(r, item=aliases.get(r.item, r.item)) for r in reviews])
    kept = kcore(unique, min_interactions)
    if not kept:
        raise DataError(
            named(urls["reviews"]), f"no interactions left after {min_interactions}-core filtering (lower kcore=)"
        )
    timelines = leave_last_out(kept)
    summaries: dict[str, list[str]] = defaultdict(list)
    for split, event in sorted((e for t in timelines.values() for e in t), key=lambda e: e[1].timestamp):
        if split == "train" and event.summary:
            summaries[event.item].append(event.summary)
    items = {r.item for r in kept}
    catalogue = build_catalogue(items, meta, summaries, judgements, aliases)
    counts = {
        "reviews_read": len(reviews),
        "merged_item_variants": len(aliases),
        "duplicate_interactions": repeated,
        "kcore_removed_interactions": len(unique) - len(kept),
        "duplicate_meta_rows": repeats,
        "items_without_meta": sum(1 for i in items if i not in meta),
        "query_judgements": len(judgements),
    }
    return Loaded(catalogue, timelines, judgements, questions, counts)

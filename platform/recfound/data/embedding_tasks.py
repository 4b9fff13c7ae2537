"""U2I, Q2I and I2I rows: a query text, the positive item's text, and hard negatives.

Negatives never include the positive or, for a user's rows, any item the user consumed: a false negative
teaches the model to push apart exactly the pairs it should retrieve.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence, Set

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recfound.data.behaviour import normal_summary, pair_codes, pair_ids
from recfound.data.context import Context
from recfound.data.esci import Esci
from recfound.data.rows import EmbeddingRow, Sample
from recfound.data.split import ROWS_AT_ONCE, Timeline
from recfound.data.templates import ITEM_INSTRUCTIONS, QUERY_INSTRUCTIONS, history_text, pick

# Clean negatives first: an irrelevant product is surely wrong, a substitute may satisfy the query.
_HARDNESS = {Esci.IRRELEVANT: 0, Esci.COMPLEMENT: 1, Esci.SUBSTITUTE: 2}
_STARS = re.compile(r"^\s*(one|two|three|four|five|[1-5])\s+stars?\b", re.IGNORECASE)
PSEUDO_QUERY_MIN_RATING = 4  # a satisfied reviewer's summary names what they were looking for


def _row(
    ctx: Context,
    task: str,
    rng: random.Random,
    query: str,
    positive: str,
    exclude: frozenset[str],
    user: str,
    source: str,
    hard: Sequence[str] = (),
    query_item: str = "",
) -> EmbeddingRow:
    negs = list(hard[: ctx.num_negatives])
    negs += ctx.negatives(rng, positive, exclude | set(negs), ctx.num_negatives - len(negs))
    item = ctx.catalogue[positive]
    return EmbeddingRow(
        query_instruction=pick(rng, QUERY_INSTRUCTIONS[task]),
        query=query,
        pos_instruction=ITEM_INSTRUCTIONS[task],
        pos=item.text,
        pos_item=positive,
        neg=tuple(ctx.catalogue[n].text for n in negs),
        neg_items=tuple(negs),
        user=user,
        category=item.category,
        source=source,
        query_item=query_item,
    )


def history(ctx: Context, timeline: Timeline, end: int) -> str:
    """Titles of the user's items before position ``end``, at most ``max_history``, oldest first."""
    return history_text([ctx.catalogue[i.item].title for _, i in timeline[max(0, end - ctx.max_history) : end]])


def u2i_rows(ctx: Context, user: str, timeline: Timeline) -> list[Sample]:
    """One row per interaction after the first: history so far -> that item; its split is the target's."""
    out: list[Sample] = []
    own = frozenset(i.item for _, i in timeline)
    for t in range(1, len(timeline)):
        split, target = timeline[t]
        rng = ctx.rng("u2i", user, t)
        out.append((split, _row(ctx, "u2i", rng, history(ctx, timeline, t), target.item, own, user, ctx.source)))
    return out


def esci_pairs(ctx: Context) -> dict[str, tuple[list[str], list[str]]]:
    """query -> (exact-match items, other judged items hardest-last), keeping only items with catalogue text."""
    judged = defaultdict(list)
    for j in ctx.judgements:
        if j.item in ctx.catalogue:
            judged[j.query].append(j)
    out = {}
    for query in sorted(judged):
        positives = sorted(j.item for j in judged[query] if j.label is Esci.EXACT)
        others = sorted((_HARDNESS[j.label], j.item) for j in judged[query] if j.label is not Esci.EXACT)
        if positives:
            out[query] = (positives, [item for _, item in others])
    return out


def q2i_mode(ctx: Context) -> tuple[bool, str]:
    """(uses pseudo-queries, why): real queries need judged products whose text is in the catalogue."""
    if not ctx.judgements:
        return True, "no query log given (queries=): review summaries serve as pseudo-queries"
    pairs = esci_pairs(ctx)
    queries = len({j.query for j in ctx.judgements})
    if pairs:
        return False, f"ESCI: {len(pairs)} of {queries} queries have an exact match with text in the catalogue"
    return True, (
        f"none of the {queries} ESCI queries has an exact-match product with text in the catalogue; "
        "review summaries serve as pseudo-queries"
    )


def _is_query_like(summary: str, generic: Set[str]) -> bool:
    return 2 <= len(summary.split()) <= 12 and not _STARS.match(summary) and normal_summary(summary) not in generic


def build_q2i(ctx: Context) -> list[Sample]:
    """Query -> item from the ESCI judgements. A query's rows share one split (by query hash) so no query is both
    trained and tested. Without usable judgements the rows are pseudo-queries, templated per user (q2i_rows)."""
    out: list[Sample] = []
    if ctx.pseudo_queries:
        return out
    for query, (positives, others) in esci_pairs(ctx).items():
        split = ctx.split(f"query:{query}")
        for positive in positives:
            rng = ctx.rng("q2i", query, positive)
            out.append((split, _row(ctx, "q2i", rng, query, positive, frozenset(positives), "", "esci", others)))
    return out


def q2i_rows(ctx: Context, user: str, timeline: Timeline) -> list[Sample]:
    """A satisfied reviewer's query-like summary -> the item, when no query log can be used; pseudo-queries keep
    their review's split so a held-out review's words are never trained on."""
    out: list[Sample] = []
    if not ctx.pseudo_queries:
        return out
    own = frozenset(i.item for _, i in timeline)
    for t, (split, event) in enumerate(timeline):
        if event.rating >= PSEUDO_QUERY_MIN_RATING and _is_query_like(event.summary, ctx.generic_summaries):
            rng = ctx.rng("q2i", user, t)
            source = f"{ctx.source}:review_summary"
            out.append((split, _row(ctx, "q2i", rng, event.summary, event.item, own, "", source)))
    return out


RELATION_SOURCES = ("also_buy", "also_view", "next_item")
"""Where a related pair comes from, in order of precedence: a pair listed twice keeps the first."""
RELATED = pa.schema([("anchor", pa.string()), ("other", pa.string()), ("relation", pa.string())])


def related_pairs(ctx: Context) -> pa.Table:
    """(anchor, related item, relation) sorted by (anchor, related item), each pair once with its first relation of
    ``RELATION_SOURCES``: the metadata's also_buy and also_view, then consecutive training purchases.

    Only training transitions count, so a user's held-out next item is never learned as "related". In Arrow: the
    consecutive purchases grow with the reviews.
    """
    ids = pa.array(sorted(ctx.catalogue), pa.string())
    ranked, ranks = [*_listed(ctx), _purchased(ctx)], len(RELATION_SOURCES)
    codes = [np.empty(0, np.int64)]
    while ranked:  # each input freed once coded: pair code * ranks + rank, so a pair's first relation sorts first
        table = ranked.pop()
        codes.append(pair_codes(ids, table["anchor"], table["other"]) * ranks + table["rank"].to_numpy())
    coded = np.sort(np.concatenate(codes))
    pair = coded // ranks
    first = np.ones(len(pair), bool)
    first[1:] = pair[1:] != pair[:-1]
    pair, rank = pair[first], coded[first] % ranks
    relation = pa.array(RELATION_SOURCES).take(rank)
    return pa.table([*pair_ids(ids, pair), relation], RELATED)


_RANKED = pa.schema([("anchor", pa.string()), ("other", pa.string()), ("rank", pa.int8())])


def _listed(ctx: Context) -> list[pa.Table]:
    """The metadata's pairs per relation (catalogue order), built from the items' lists by Arrow: no Python object
    per pair."""
    items = list(ctx.catalogue.values())
    ids = pa.array([item.item_id for item in items], pa.string())
    tables = []
    for rank, relation in enumerate(RELATION_SOURCES[:2]):
        lists = pa.array([getattr(item, relation) for item in items], pa.list_(pa.string()))
        others = pc.list_flatten(lists)
        ranks = pa.array(np.full(len(others), rank, np.int8))
        tables.append(pa.Table.from_arrays([ids.take(pc.list_parent_indices(lists)), others, ranks], schema=_RANKED))
    return tables


def _purchased(ctx: Context) -> pa.Table:
    purchases = ctx.behaviour.next_item_pairs()
    ranks = pa.array(np.full(purchases.num_rows, RELATION_SOURCES.index("next_item"), np.int8))
    return pa.Table.from_arrays([purchases["earlier"], purchases["later"], ranks], schema=_RANKED)


def related_rows(pairs: pa.Table) -> Iterator[tuple[str, str, str]]:
    """``pairs``' rows as (anchor, other, relation), a slice at a time: only a slice is ever Python objects."""
    for batch in pairs.to_batches(max_chunksize=ROWS_AT_ONCE):
        yield from zip(*(batch[name].to_pylist() for name in RELATED.names), strict=True)


def build_i2i(ctx: Context) -> Iterator[Sample]:
    """Item -> related item. Rows split by the anchor item, so an anchor's positives are evaluated together. Yielded
    one at a time: there is one per related pair, and consecutive purchases make them grow with the reviews."""
    for anchor, rows in itertools.groupby(related_rows(related_pairs(ctx)), key=lambda row: row[0]):
        related = list(rows)
        exclude = frozenset(other for _, other, _ in related) | {anchor}
        for _, other, relation in related:
            rng = ctx.rng("i2i", anchor, other)
            source = f"{ctx.source}:{relation}"
            row = _row(ctx, "i2i", rng, ctx.catalogue[anchor].text, other, exclude, "", source, query_item=anchor)
            yield ctx.split(f"item:{anchor}"), row

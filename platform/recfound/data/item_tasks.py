"""Item-understanding generative tasks: product relations, attribute extraction, matching, item profiles.

They need item metadata. Rows split by the anchor item's hash (the same key as I2I), so an item held out
for evaluation is held out from every item-level task. Each builder yields its rows one at a time to the writer:
held as a list, the item profiles of a 4M-review synthetic build raised the driver by ~250 MiB at the build's end.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from recfound.data.catalogue import CatalogueItem
from recfound.data.context import Context
from recfound.data.embedding_tasks import related_pairs, related_rows
from recfound.data.rows import GenerativeRow, Sample, TaskUnavailable
from recfound.data.templates import INSTRUCTIONS, NO, RELATIONS, YES, alpaca, pair_text, pick

DESCRIPTION_WORDS = 150
_RELATION_LABEL = {"also_buy": RELATIONS[0], "also_view": RELATIONS[1], "similar": RELATIONS[2]}


def _with_meta(ctx: Context, task: str) -> Iterator[CatalogueItem]:
    if not any(i.has_meta for i in ctx.catalogue.values()):
        raise TaskUnavailable(f"{task} needs item metadata (meta=)")
    return (i for i in ctx.catalogue.values() if i.has_meta)


def _words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


def build_product_relation_prediction(ctx: Context) -> Iterator[Sample]:
    """(item, related item) -> also buy / also view, from the metadata's relation lists."""
    task = "product_relation_prediction"
    _with_meta(ctx, task)
    listed = related_pairs(ctx).filter(pc.is_in(pc.field("relation"), pa.array(list(_RELATION_LABEL))))
    labels = {_RELATION_LABEL[r] for r in pc.unique(listed["relation"]).to_pylist()}
    options = [r for r in RELATIONS if r in labels]
    if len(options) < 2:
        raise TaskUnavailable(f"{task} needs at least two relation types (also_buy, also_view) within the catalogue")
    for a, b, relation in related_rows(listed):
        text = pair_text(ctx.catalogue[a].title, ctx.catalogue[b].title)
        prompt = alpaca(pick(ctx.rng(task, a, b), INSTRUCTIONS[task]), text, options)
        yield ctx.split(f"item:{a}"), GenerativeRow(prompt, _RELATION_LABEL[relation], "", a, ctx.source)


def build_attribute_value_extraction(ctx: Context) -> Iterator[Sample]:
    """Product text -> the values of brand/category, asked only for values that really occur in the text."""
    task = "attribute_value_extraction"
    built = False
    for item in _with_meta(ctx, task):
        description = _words(item.description, DESCRIPTION_WORDS)
        # A title taken from the description's first sentence would only repeat it.
        text = description if description.startswith(item.title) else f"{item.title}. {description}".strip(". ")
        candidates = [("brand", item.brand), ("category", item.categories[-1] if item.categories else "")]
        found = [(name, value) for name, value in candidates if value and _occurs(value, text)]
        if not found:
            continue
        prompt = alpaca(
            pick(ctx.rng(task, item.item_id), INSTRUCTIONS[task]),
            f"Text: {text}\nAttributes: {', '.join(name for name, _ in found)}",
        )
        response = "; ".join(f"{name}: {value}" for name, value in found)
        built = True
        yield ctx.split(f"item:{item.item_id}"), GenerativeRow(prompt, response, "", item.item_id, ctx.source)
    if not built:
        raise TaskUnavailable(f"{task}: no item's brand or category occurs in its title or description")


def _occurs(value: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text, re.IGNORECASE) is not None


def _listing(item: CatalogueItem) -> str:
    brand = item.brand if item.brand and item.brand.lower() not in item.title.lower() else ""
    return f"{brand} {item.title}".strip()


def _relisting(item: CatalogueItem, rng: random.Random) -> str:
    """The same product as another seller might list it: words dropped, brand or category added, case lost.

    The catalogue has no duplicate listings, so matching pairs are derived; non-matches are real other items.
    """
    words = item.title.replace(",", "").split()
    kept = [w for i, w in enumerate(words) if i == 0 or rng.random() > 0.25]
    text = " ".join(kept)
    if item.brand and item.brand.lower() not in text.lower() and rng.random() < 0.5:
        text = f"{item.brand} {text}"
    if item.category and rng.random() < 0.5:
        text = f"{text} ({item.category})"
    return text.lower() if rng.random() < 0.3 else text


def build_product_matching(ctx: Context) -> Iterator[Sample]:
    """Per item, one matching pair (listing vs. its relisting -> yes) and one hard non-match (same category -> no)."""
    task = "product_matching"
    for item in _with_meta(ctx, task):
        rng = ctx.rng(task, item.item_id)
        split = ctx.split(f"item:{item.item_id}")
        instruction = pick(rng, INSTRUCTIONS[task])
        names = ("Listing A", "Listing B")
        match = alpaca(instruction, pair_text(_listing(item), _relisting(item, rng), names))
        yield split, GenerativeRow(match, YES, "", item.item_id, ctx.source)
        for other in ctx.negatives(rng, item.item_id, frozenset(), 1):
            if ctx.catalogue[other].title != item.title:
                other_text = _relisting(ctx.catalogue[other], rng)
                mismatch = alpaca(instruction, pair_text(_listing(item), other_text, names))
                yield split, GenerativeRow(mismatch, NO, "", item.item_id, ctx.source)


def build_item_profile(ctx: Context) -> Iterator[Sample]:
    """Title, category, brand and features -> the product description (items without one are left out)."""
    task = "item_profile"
    built = False
    for item in _with_meta(ctx, task):
        description = _words(item.description, DESCRIPTION_WORDS)
        if len(description.split()) < 5:
            continue
        lines = [item.text.replace("; ", "\n")] + [f"Feature: {f}" for f in item.features[:10]]
        prompt = alpaca(pick(ctx.rng(task, item.item_id), INSTRUCTIONS[task]), "\n".join(lines))
        built = True
        yield ctx.split(f"item:{item.item_id}"), GenerativeRow(prompt, description, "", item.item_id, ctx.source)
    if not built:
        raise TaskUnavailable(f"{task}: no item has a description of at least 5 words")

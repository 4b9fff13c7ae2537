"""The item catalogue tasks draw from: every item gets a title and text, even without a metadata row.

Real dumps are patchy (HTML fragments as titles, items with no metadata), and a task must never crash on or
silently drop such an item, so each field has a fallback chain ending at the item id.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass

from recfound.data.esci import QueryJudgement
from recfound.data.sources import Item
from recfound.data.templates import item_text

TITLE_WORDS = 12  # a title taken from a description's first sentence is cut to this many words


@dataclass(frozen=True, slots=True)
class CatalogueItem:
    item_id: str
    title: str
    text: str
    category: str
    categories: tuple[str, ...] = ()
    brand: str = ""
    description: str = ""
    features: tuple[str, ...] = ()
    also_buy: tuple[str, ...] = ()
    also_view: tuple[str, ...] = ()
    has_meta: bool = False


def _first_sentence(text: str) -> str:
    sentence = text.split(". ")[0].strip()
    return " ".join(sentence.split()[:TITLE_WORDS]).rstrip(".")


def _related(ids: Sequence[str], aliases: Mapping[str, str], known: Mapping[str, str], item_id: str) -> tuple[str, ...]:
    """The known items of ``ids`` (canonical, once each), as the catalogue's own id objects."""
    canonical = (aliases.get(i, i) for i in ids)
    return tuple(known[i] for i in dict.fromkeys(canonical) if i in known and i != item_id)


def _top_level(items: Iterable[Item]) -> int:
    """Depth of the first category level that tells items apart: a root every item shares (a one-domain dump's
    "Magazine Subscriptions") would put the whole catalogue in one category."""
    paths = [i.categories for i in items if i.categories]
    depth = 0
    while any(len(p) > depth + 1 for p in paths) and len({p[depth] for p in paths if len(p) > depth}) == 1:
        depth += 1
    return depth


def _display_title(item: Item) -> str:
    return item.title or _first_sentence(item.description)


def variant_aliases(item_ids: Iterable[str], meta: Mapping[str, Item]) -> dict[str, str]:
    """Variant id -> canonical id for items shown under the same title (2018 dumps list print/digital/duration
    variants, even re-branded ones, separately).

    Histories show titles only, so without merging, a user who bought two variants has the test target's
    exact text in the training history. The canonical id is the smallest, independent of file order.
    """
    by_title: dict[str, list[str]] = {}
    for item_id in sorted(set(item_ids)):
        item = meta.get(item_id)
        if item is not None and _display_title(item):
            by_title.setdefault(_display_title(item).lower(), []).append(item_id)
    return {variant: ids[0] for ids in by_title.values() for variant in ids[1:]}


def build_catalogue(
    item_ids: Iterable[str],
    meta: Mapping[str, Item],
    summaries: Mapping[str, Sequence[str]],
    judgements: Sequence[QueryJudgement] = (),
    aliases: Mapping[str, str] | None = None,
) -> dict[str, CatalogueItem]:
    """Items that occur in interactions, plus ESCI products that come with a title; keyed and sorted by id.

    ``summaries`` are review summaries from training interactions only (earliest first): used as a title when an
    item has no metadata, they must not reveal a held-out review. ``aliases`` map variant ids in the relation
    lists to the ids the interactions use.

    Brands, category paths and related ids are kept as one object per value (a parser makes one per row): at 4M
    synthetic reviews that took the catalogue's live objects from 266 to 198 MiB, in the driver and, pickled
    with their sharing kept, in every templating worker.
    """
    aliases = aliases or {}
    ids = sorted(set(item_ids))
    known = {i: i for i in ids}
    level = _top_level(meta[i] for i in ids if i in meta)
    out: dict[str, CatalogueItem] = {}
    for item_id in ids:
        item = meta.get(item_id, Item(item_id))
        quotes = summaries.get(item_id, ())
        title = _display_title(item) or (quotes[0] if quotes else "") or item_id
        path, brand = tuple(map(sys.intern, item.categories)), sys.intern(item.brand)
        out[item_id] = CatalogueItem(
            item_id=item_id,
            title=title,
            text=item_text(title, path, brand),
            category=path[min(level, len(path) - 1)] if path else "",
            categories=path,
            brand=brand,
            description=item.description,
            features=item.features,
            also_buy=_related(item.also_buy, aliases, known, item_id),
            also_view=_related(item.also_view, aliases, known, item_id),
            has_meta=item_id in meta,
        )
    for j in judgements:
        if j.item not in out and j.title:
            out[j.item] = CatalogueItem(
                j.item, j.title, item_text(j.title, (), j.brand), "", brand=sys.intern(j.brand), has_meta=True
            )
    return dict(sorted(out.items()))


class NegativeSampler:
    """Hard negatives: items of the positive's category first (the paper's evaluation pools are same-category),
    then any item; never an excluded one (the positive, the user's own items)."""

    def __init__(self, catalogue: Mapping[str, CatalogueItem]):
        self.all = sorted(catalogue)
        self.by_category: dict[str, list[str]] = {}
        for item_id in self.all:
            self.by_category.setdefault(catalogue[item_id].category, []).append(item_id)

    def sample(self, rng: random.Random, category: str, exclude: Set[str], k: int) -> list[str]:
        picked: list[str] = []
        for pool in (self.by_category.get(category, []), self.all):
            self._draw(rng, pool, exclude, k, picked)
        return picked

    @staticmethod
    def _draw(rng: random.Random, pool: list[str], exclude: Set[str], k: int, picked: list[str]) -> None:
        # Rejection sampling keeps big catalogues O(k); a full scan is the fallback when most of the pool is excluded.
        for _ in range(8 * k):
            if len(picked) >= k or not pool:
                return
            candidate = pool[rng.randrange(len(pool))]
            if candidate not in exclude and candidate not in picked:
                picked.append(candidate)
        rest = [c for c in pool if c not in exclude and c not in picked]
        picked.extend(rng.sample(rest, min(k - len(picked), len(rest))))

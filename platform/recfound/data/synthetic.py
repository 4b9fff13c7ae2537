"""Synthetic shops in the Amazon 2018 raw format, so the pipeline runs end to end with no download.

``write_catalogue``: a small shop, held in memory, that the default build uses. Users have latent tastes over
categories; what they buy and how they rate it follows those tastes, so the tasks carry learnable signal. The files
keep the real dumps' quirks (a repeated metadata row, reviewed items without metadata, relations pointing outside
the catalogue) so the default build exercises those paths too.

``write_dump``: the same kind of shop at any size (millions of reviews), written streaming as gzip JSON-lines shards
with the quirks at a fixed rate, for building and benchmarking at dump scale.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import NamedTuple

import fsspec
from fsspec.core import url_to_fs
from pydantic import Field, model_validator

from recfound.config import Config


class _Category(NamedTuple):
    brands: list[str]
    nouns: dict[str, list[str]]  # product noun -> its sizes/variants
    adjectives: list[str]
    use: str


_SHOP = {
    "Kitchen": _Category(
        ["Copperline", "Hearthwell", "Saucier"],
        {
            "skillet": ["10-inch", "12-inch"],
            "kettle": ["1.7 L", "1 L"],
            "blender": ["1000 W", "48 oz"],
            "chef knife": ["8-inch", "6-inch"],
            "stock pot": ["8 qt", "12 qt"],
        },
        ["cast iron", "stainless steel", "non-stick", "ceramic", "professional"],
        "for everyday cooking",
    ),
    "Outdoors": _Category(
        ["Northpeak", "Trailborn", "Ridgeway"],
        {
            "tent": ["2-person", "4-person"],
            "backpack": ["40 L", "65 L"],
            "headlamp": ["300 lumens", "rechargeable"],
            "sleeping bag": ["20 F", "3-season"],
            "water filter": ["straw", "gravity 4 L"],
        },
        ["lightweight", "waterproof", "ultralight", "insulated", "rugged"],
        "for camping and hiking",
    ),
    "Electronics": _Category(
        ["Voltaic", "Lumina", "Sonorix"],
        {
            "headphones": ["over-ear", "black"],
            "speaker": ["20 W", "waterproof"],
            "charger": ["65 W", "USB-C"],
            "keyboard": ["mechanical", "full size"],
            "webcam": ["1080p", "4K"],
        },
        ["wireless", "bluetooth", "portable", "compact", "low-latency"],
        "for work and travel",
    ),
    "Beauty": _Category(
        ["Velvetine", "Bloomcraft", "Puregleam"],
        {
            "face serum": ["30 ml", "2-pack"],
            "shampoo": ["500 ml", "travel size"],
            "lip balm": ["4-pack", "tinted"],
            "moisturizer": ["50 ml", "SPF 30"],
            "hair oil": ["100 ml", "travel size"],
        },
        ["hydrating", "organic", "fragrance-free", "vitamin C", "argan"],
        "for a daily routine",
    ),
    "Toys": _Category(
        ["Playforge", "Tinkertot", "Brightblocks"],
        {
            "puzzle": ["500 pieces", "1000 pieces"],
            "building set": ["250 pieces", "ages 6+"],
            "plush bear": ["12-inch", "brown"],
            "race car": ["1:24 scale", "ages 3+"],
            "board game": ["2-6 players", "family edition"],
        },
        ["wooden", "magnetic", "educational", "classic", "colorful"],
        "for kids and families",
    ),
    "Garden": _Category(
        ["Greenhaven", "Rootwise", "Petalworks"],
        {
            "hose": ["50 ft", "100 ft"],
            "pruning shears": ["8-inch", "bypass"],
            "planter": ["large", "set of 3"],
            "watering can": ["2 gallon", "1 gallon"],
            "seed kit": ["12 varieties", "herbs"],
        },
        ["expandable", "heavy-duty", "self-watering", "ergonomic", "heirloom"],
        "for the yard and garden",
    ),
}
_SUMMARIES = {
    5: ["Love this {noun}", "Best {noun} I have owned", "Excellent {adj} {noun}", "Exactly what I needed"],
    4: ["Very good {noun}", "Solid {noun} for the price", "Works well, would buy again"],
    3: ["Decent {noun}", "It's okay", "Average {noun}, nothing special"],
    2: ["Not great", "Disappointing {noun}", "Expected more from {brand}"],
    1: ["Broke after a week", "Do not buy this {noun}", "Terrible {noun}"],
}
_OPENINGS = {
    5: "I use this {noun} all the time and it is fantastic.",
    4: "This {noun} does its job well.",
    3: "The {noun} is fine but unremarkable.",
    2: "I had problems with this {noun} early on.",
    1: "This {noun} failed almost immediately.",
}
_START, _END = 1388534400, 1498867200  # 2014-01-01 .. 2017-07-01: first reviews; later ones follow
_ID_CHARS = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"  # ASIN-like: no I or O


class SyntheticConfig(Config):
    users: int = Field(300, ge=10)
    """Number of synthetic users (each writes min_reviews..max_reviews reviews)."""
    items: int = Field(200, ge=20)
    """Number of synthetic items in the catalogue."""
    min_reviews: int = Field(5, ge=1)
    """Fewest reviews per user; keep it >= kcore or most users are filtered out."""
    max_reviews: int = Field(12, ge=1)
    """Most reviews per user."""
    queries: int = Field(120, ge=0)
    """ESCI-style search queries to generate (0: no queries file, Q2I falls back to pseudo-queries)."""
    seed: int = 0
    """Seed of the generator: the same seed writes byte-identical files."""


@dataclass
class _Item:
    item_id: str
    category: str
    brand: str
    noun: str
    adj: str
    extra: str
    quality: float
    series: int = 0  # tells apart items whose words collide (large catalogues)

    @property
    def title(self) -> str:
        series = f" - Series {self.series}" if self.series else ""
        return f"{self.brand} {self.adj.title()} {self.noun.title()}, {self.extra}{series}"


def _items(cfg: SyntheticConfig, rng: random.Random) -> list[_Item]:
    names = list(_SHOP)
    out: list[_Item] = []
    ids: set[str] = set()
    titles: set[str] = set()
    while len(out) < cfg.items:
        category = names[len(out) % len(names)]
        shop = _SHOP[category]
        noun = rng.choice(sorted(shop.nouns))
        item_id = "B0" + "".join(rng.choices(_ID_CHARS, k=8))
        item = _Item(
            item_id,
            category,
            rng.choice(shop.brands),
            noun,
            rng.choice(shop.adjectives),
            rng.choice(shop.nouns[noun]),
            rng.gauss(0, 0.6),
        )
        while item.title in titles:
            item.series += 1
        if item_id not in ids:
            ids.add(item_id)
            titles.add(item.title)
            out.append(item)
    return out


def _reviews(cfg: SyntheticConfig, items: list[_Item], rng: random.Random) -> list[dict]:
    names = list(_SHOP)
    by_category = {c: [i for i in items if i.category == c] for c in names}
    popularity = {i.item_id: 1 / (rank % 40 + 1) ** 0.8 for rank, i in enumerate(rng.sample(items, len(items)))}
    out = []
    for u in range(cfg.users):
        user = f"U{u:05d}" + "".join(rng.choices("ABCDEFGHJKLMNPQRSTUVWXYZ", k=6))
        taste = [rng.gammavariate(0.4, 1) + 1e-3 for _ in names]
        stamp = rng.randrange(_START, _END)
        owned: set[str] = set()
        for _ in range(rng.randint(cfg.min_reviews, max(cfg.min_reviews, cfg.max_reviews))):
            category = rng.choices(names, weights=taste)[0]
            pool = [i for i in by_category[category] if i.item_id not in owned] or [
                i for i in items if i.item_id not in owned
            ]
            item = rng.choices(pool, weights=[popularity[i.item_id] for i in pool])[0]
            owned.add(item.item_id)
            affinity = taste[names.index(item.category)] / max(taste)
            rating = min(5, max(1, round(1.5 + 3 * affinity + item.quality + rng.gauss(0, 0.6))))
            words = {"noun": item.noun, "adj": item.adj, "brand": item.brand}
            summary = rng.choice(_SUMMARIES[rating]).format(**words)
            text = f"{_OPENINGS[rating].format(**words)} I bought it {_SHOP[item.category].use}."
            out.append(
                {
                    "overall": float(rating),
                    "verified": True,
                    "reviewerID": user,
                    "asin": item.item_id,
                    "reviewText": text,
                    "summary": summary,
                    "unixReviewTime": stamp,
                    "reviewTime": time.strftime("%m %d, %Y", time.gmtime(stamp)),
                }
            )
            stamp += rng.randint(1, 60) * 86400
    return sorted(out, key=lambda r: (r["asin"], r["unixReviewTime"], r["reviewerID"]))


def _meta(items: list[_Item], reviews: list[dict], rng: random.Random) -> list[dict]:
    baskets: dict[str, list[str]] = {}
    for r in reviews:
        baskets.setdefault(r["reviewerID"], []).append(r["asin"])
    together: dict[str, Counter[str]] = {i.item_id: Counter() for i in items}
    for basket in baskets.values():
        for a in basket:
            together[a].update(b for b in basket if b != a)
    out = []
    for item in items:
        counts = together[item.item_id]
        also_buy = sorted((b for b, n in counts.items() if n >= 2), key=lambda b: (-counts[b], b))[:4]
        peers = [i.item_id for i in items if i.category == item.category and i.item_id != item.item_id]
        use = _SHOP[item.category].use
        out.append(
            {
                "asin": item.item_id,
                "title": item.title,
                "brand": item.brand,
                "main_cat": item.category,
                "category": [item.category, item.noun.title()],
                "description": [f"This {item.adj} {item.noun} from {item.brand} is made {use}.", ""],
                "feature": [f"{item.adj.capitalize()} design", item.extra],
                "also_buy": also_buy + ["B0OUTSIDE01"],  # real dumps point outside the 5-core catalogue too
                "also_view": rng.sample(peers, min(3, len(peers))),
                "price": "",
                "similar_item": "",
            }
        )
    missing = set(rng.sample([i.item_id for i in items], max(1, len(items) // 50)))
    kept = [m for m in out if m["asin"] not in missing]
    return kept + kept[:1]  # real 2018 dumps repeat some rows


def _queries(cfg: SyntheticConfig, items: list[_Item], rng: random.Random) -> list[dict]:
    """ESCI-style judgements: exact = every item whose title has all the query's words."""
    out = []
    for item in rng.sample(items, min(cfg.queries, len(items))):
        query = rng.choice([f"{item.adj} {item.noun}", f"{item.brand} {item.noun}", f"{item.noun} {item.extra}"])
        query = query.lower()
        words = query.split()
        exact = [i for i in items if all(w in i.title.lower() for w in words)]
        subs = [i for i in items if i.noun == item.noun and i not in exact]
        comps = [i for i in items if i.category == item.category and i.noun != item.noun]
        others = [i for i in items if i.category != item.category]
        judged = [(i, "E") for i in exact[:3]] + [(i, "S") for i in rng.sample(subs, min(2, len(subs)))]
        judged += [(i, "C") for i in rng.sample(comps, min(1, len(comps)))] + [(i, "I") for i in rng.sample(others, 2)]
        out += [
            {
                "query": query,
                "product_id": i.item_id,
                "esci_label": label,
                "product_title": i.title,
                "product_brand": i.brand,
            }
            for i, label in judged
        ]
    return out


def _gzip_jsonl(rows: list[dict]) -> bytes:
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return gzip.compress(text, mtime=0)  # mtime=0: same rows, same bytes


def write_catalogue(cfg: SyntheticConfig, raw_dir: str) -> dict[str, str]:
    """Write reviews, metadata (and queries) under ``raw_dir``; returns their URLs keyed like BuildConfig."""
    rng = random.Random(cfg.seed)
    items = _items(cfg, rng)
    reviews = _reviews(cfg, items, rng)
    files = {
        "reviews": ("reviews_Synthetic_5.json.gz", _gzip_jsonl(reviews)),
        "meta": ("meta_Synthetic.json.gz", _gzip_jsonl(_meta(items, reviews, rng))),
    }
    if cfg.queries:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, ["query", "product_id", "esci_label", "product_title", "product_brand"])
        writer.writeheader()
        writer.writerows(_queries(cfg, items, rng))
        files["queries"] = ("queries_Synthetic.csv", buffer.getvalue().encode())
    fs, root = fsspec.core.url_to_fs(raw_dir)
    fs.makedirs(root, exist_ok=True)
    urls = {}
    for key, (name, data) in files.items():
        urls[key] = f"{raw_dir.rstrip('/')}/{name}"
        with fsspec.open(urls[key], "wb") as handle:
            handle.write(data)
    return urls


# --- a dump of any size, written streaming -----------------------------------------------------------------------

_CATEGORIES = list(_SHOP)  # item i is in category i % 6
_VARIANT, _NO_META, _REPEATED_META, _HTML_TITLE, _NO_BRAND, _NO_CATEGORY = 37, 53, 71, 89, 29, 31
"""Every n-th item carries one of the real 2018 dumps' quirks: a variant listing of the item before it in its
category, no metadata row, its metadata row written twice, an HTML fragment as title, no brand, no category path.
Periods rather than draws: two neighbouring items never both lack metadata, so no metadata shard is empty."""
_REPEATED_REVIEW, _NO_TEXT, _NO_SUMMARY, _VOTED = 0.005, 0.02, 0.01, 0.1
"""Share of reviews written twice verbatim, without a text, without a summary, with a (string) vote count."""
_OUTSIDE = "B0OUTSIDE01"  # a relation to an item outside the dump's catalogue, as real dumps have (no I/O ids)


class DumpConfig(Config):
    """A raw dump in the Amazon 2018 format at dump scale: reviews and metadata as gzip JSON-lines shards."""

    reviews: int = Field(100_000, ge=1)
    """Review rows to write, repeated ones included (1 in 200 is written twice verbatim, as in the real dumps). Below
    about 300, 5-core filtering leaves nothing to build."""
    shards: int = Field(8, ge=1)
    """Files the reviews are split across (<out>/reviews/part-00000.json.gz, ...), and the metadata likewise."""
    items: int | None = Field(None, ge=20)
    """Items in the catalogue. Unset: one per 20 reviews (at least 20), dense enough that most survive 5-core."""
    seed: int = 0
    """Seed of users, tastes and item attributes: the same seed and sizes write byte-identical files."""
    out: str = "runs/data/dump"
    """Directory (local path or fsspec URL); its reviews/ and meta/ folders are replaced."""

    @property
    def catalogue(self) -> int:
        """Items in the dump: ``items``, or its default for this many reviews."""
        return self.items or max(20, self.reviews // 20)

    @model_validator(mode="after")
    def _no_empty_shard(self) -> DumpConfig:
        most = min(self.reviews, self.catalogue // 2)
        if self.shards > most:
            raise ValueError(
                f"shards={self.shards} would leave a file empty: at most {most} for "
                f"{self.reviews} reviews and {self.catalogue} items (two items per metadata file)"
            )
        return self


def _dump_id(seed: int, index: int) -> str:
    """An ASIN-like id, distinct per index: an affine bijection of the 34^8 ids (2654435761 is coprime to 34)."""
    n = (index * 2654435761 + seed * 40503 + 0x5EED) % len(_ID_CHARS) ** 8
    chars = []
    for _ in range(8):
        n, digit = divmod(n, len(_ID_CHARS))
        chars.append(_ID_CHARS[digit])
    return "B0" + "".join(chars)


@functools.lru_cache(maxsize=4096)
def _dump_item(seed: int, index: int) -> _Item:
    """Item ``index``, a pure function of (seed, index): a catalogue of any size without holding it (the cache of hot
    items is bounded). The series number makes every title distinct, except a variant's, which is its original's."""
    if index % _VARIANT == _VARIANT - 1:
        return replace(_dump_item(seed, index - len(_CATEGORIES)), item_id=_dump_id(seed, index))
    rng = random.Random(f"{seed}:item:{index}")
    category = _CATEGORIES[index % len(_CATEGORIES)]
    shop = _SHOP[category]
    noun = rng.choice(sorted(shop.nouns))
    return _Item(
        _dump_id(seed, index),
        category,
        rng.choice(shop.brands),
        noun,
        rng.choice(shop.adjectives),
        rng.choice(shop.nouns[noun]),
        rng.gauss(0, 0.6),
        series=index + 1,
    )


def _pick(rng: random.Random, category: int, items: int) -> int:
    """An item of the category, popular ones more often: rank = n * u^2 has a density falling as 1/sqrt(rank), a
    long tail drawn without a table of weights."""
    count = (items - category + len(_CATEGORIES) - 1) // len(_CATEGORIES)
    return category + len(_CATEGORIES) * int(count * rng.random() ** 2)


def _dump_review(rng: random.Random, user: str, item: _Item, rating: int, stamp: int) -> dict:
    """One review in the 2018 layout, fields the readers skip (style, vote, reviewerName) included as real rows have
    them; texts are a sentence or two, shorter than most real reviews."""
    words = {"noun": item.noun, "adj": item.adj, "brand": item.brand}
    row = {
        "overall": float(rating),
        "verified": rng.random() < 0.9,
        "reviewTime": time.strftime("%m %d, %Y", time.gmtime(stamp)),
        "reviewerID": user,
        "asin": item.item_id,
        "style": {"Size:": f" {item.extra}"},
        "reviewerName": f"Customer {user[-6:].title()}",
        "reviewText": f"{_OPENINGS[rating].format(**words)} I bought it {_SHOP[item.category].use}.",
        "summary": rng.choice(_SUMMARIES[rating]).format(**words),
        "unixReviewTime": stamp,
    }
    if rng.random() < _VOTED:
        row["vote"] = f"{rng.randint(2, 3000):,}"  # a string with a thousands separator, as in the real dumps
    if rng.random() < _NO_TEXT:
        del row["reviewText"]
    elif rng.random() < _NO_SUMMARY:
        del row["summary"]
    return row


def _dump_reviews(seed: int, items: int) -> Iterator[dict]:
    """Users one after another, each with 5-12 reviews in time order, rated by taste and item quality as in the
    small shop; endless, the caller takes as many rows as it wants. Only the current user is held."""
    rng = random.Random(seed)
    for u in itertools.count():
        user = f"A{u:07d}" + "".join(rng.choices(_ID_CHARS[10:], k=6))
        taste = [rng.gammavariate(0.4, 1) + 1e-3 for _ in _CATEGORIES]
        stamp = rng.randrange(_START, _END)
        owned: set[int] = set()
        for _ in range(rng.randint(5, 12)):
            category = rng.choices(range(len(_CATEGORIES)), weights=taste)[0]
            index = _pick(rng, category, items)
            if index in owned:  # one more draw; a user reviewing an item twice stays possible, as in real dumps
                index = _pick(rng, category, items)
            owned.add(index)
            item = _dump_item(seed, index)
            rating = min(5, max(1, round(1.5 + 3 * taste[category] / max(taste) + item.quality + rng.gauss(0, 0.6))))
            row = _dump_review(rng, user, item, rating, stamp)
            yield row
            if rng.random() < _REPEATED_REVIEW:
                yield row
            stamp += rng.randint(1, 60) * 86400


def _dump_meta(seed: int, index: int, items: int) -> list[dict]:
    """Item ``index``'s metadata rows: none, one, or the same row twice (the first one wins when read)."""
    if index % _NO_META == 17:
        return []
    item = _dump_item(seed, index)
    step = len(_CATEGORIES)
    use = _SHOP[item.category].use
    row = {
        "category": [] if index % _NO_CATEGORY == 7 else [item.category, item.noun.title()],
        "description": [
            f"The {item.brand} {item.adj} {item.noun} (series {item.series}) is made {use}.",
            "",
            "<b>Care:</b> wipe clean &amp; store dry.",
        ],
        "title": '<span class="a-size-medium">' if index % _HTML_TITLE == 11 else item.title,
        "also_buy": [_dump_id(seed, i) for i in (index + step, index + 2 * step) if i < items] + [_OUTSIDE],
        "brand": item.brand,
        "feature": [f"{item.adj.capitalize()} design", item.extra],
        "rank": f"{index + 1:,} in {item.category} (",
        "also_view": [_dump_id(seed, index - step)] if index >= step else [],
        "main_cat": item.category,
        "price": "",
        "asin": item.item_id,
    }
    if index % _NO_BRAND == 3:
        del row["brand"]
    return [row, row] if index % _REPEATED_META == 5 else [row]


def _bounds(total: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges of near-equal size covering range(total)."""
    edges = [total * k // parts for k in range(parts + 1)]
    return list(itertools.pairwise(edges))


def _write_shards(directory: str, parts: Iterable[Iterable[dict]]) -> None:
    """Each part into its own gzip JSON-lines file, one file open at a time and no row kept. The folder is replaced
    first: a leftover shard of a bigger earlier dump would otherwise be read as part of this one."""
    fs, root = url_to_fs(directory)
    if fs.exists(root):
        fs.rm(root, recursive=True)
    fs.makedirs(root, exist_ok=True)
    for k, rows in enumerate(parts):
        with fsspec.open(f"{directory}/part-{k:05d}.json.gz", "wb") as raw:
            # filename="" and mtime=0: the gzip header holds neither, so the bytes depend on the rows alone
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as handle:
                for row in rows:
                    handle.write((json.dumps(row) + "\n").encode())


def write_dump(cfg: DumpConfig) -> dict[str, str]:
    """Write ``cfg.reviews`` review rows and the catalogue's metadata as shards; returns the two folders keyed like
    BuildConfig (``reviews=<out>/reviews meta=<out>/meta``). Rows are generated and written one at a time, so
    memory does not grow with the dump."""
    out = cfg.out.rstrip("/")
    reviews = _dump_reviews(cfg.seed, cfg.catalogue)
    _write_shards(f"{out}/reviews", (itertools.islice(reviews, hi - lo) for lo, hi in _bounds(cfg.reviews, cfg.shards)))
    _write_shards(
        f"{out}/meta",
        (
            itertools.chain.from_iterable(_dump_meta(cfg.seed, i, cfg.catalogue) for i in range(lo, hi))
            for lo, hi in _bounds(cfg.catalogue, cfg.shards)
        ),
    )
    return {"reviews": f"{out}/reviews", "meta": f"{out}/meta"}

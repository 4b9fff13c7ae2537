"""A synthetic shop of any size (millions of reviews) in the Amazon 2018 raw format, written streaming as gzip
JSON-lines shards with the real dumps' quirks at a fixed rate, for building and benchmarking at dump scale."""

from __future__ import annotations

import functools
import gzip
import itertools
import json
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace

import fsspec
from fsspec.core import url_to_fs
from pydantic import Field, model_validator

from recfound.config import Config
from recfound.data.synthetic_shop import END, ID_CHARS, OPENINGS, SHOP, START, SUMMARIES, Item, shop_item

_CATEGORIES = list(SHOP)  # item i is in category i % 6
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
    n = (index * 2654435761 + seed * 40503 + 0x5EED) % len(ID_CHARS) ** 8
    chars = []
    for _ in range(8):
        n, digit = divmod(n, len(ID_CHARS))
        chars.append(ID_CHARS[digit])
    return "B0" + "".join(chars)


@functools.lru_cache(maxsize=4096)
def _dump_item(seed: int, index: int) -> Item:
    """Item ``index``, a pure function of (seed, index): a catalogue of any size without holding it (the cache of hot
    items is bounded). The series number makes every title distinct, except a variant's, which is its original's."""
    if index % _VARIANT == _VARIANT - 1:
        return replace(_dump_item(seed, index - len(_CATEGORIES)), item_id=_dump_id(seed, index))
    rng = random.Random(f"{seed}:item:{index}")
    category = _CATEGORIES[index % len(_CATEGORIES)]
    noun = rng.choice(sorted(SHOP[category].nouns))
    return shop_item(rng, _dump_id(seed, index), category, noun, series=index + 1)


def _pick(rng: random.Random, category: int, items: int) -> int:
    """An item of the category, popular ones more often: rank = n * u^2 has a density falling as 1/sqrt(rank), a
    long tail drawn without a table of weights."""
    count = (items - category + len(_CATEGORIES) - 1) // len(_CATEGORIES)
    return category + len(_CATEGORIES) * int(count * rng.random() ** 2)


def _dump_review(rng: random.Random, user: str, item: Item, rating: int, stamp: int) -> dict:
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
        "reviewText": f"{OPENINGS[rating].format(**words)} I bought it {SHOP[item.category].use}.",
        "summary": rng.choice(SUMMARIES[rating]).format(**words),
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
        user = f"A{u:07d}" + "".join(rng.choices(ID_CHARS[10:], k=6))
        taste = [rng.gammavariate(0.4, 1) + 1e-3 for _ in _CATEGORIES]
        stamp = rng.randrange(START, END)
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
    use = SHOP[item.category].use
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

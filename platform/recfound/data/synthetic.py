"""Synthetic shops in the Amazon 2018 raw format, so the pipeline runs end to end with no download.

``write_catalogue``: a small shop, held in memory, that the default build uses. Users have latent tastes over
categories; what they buy and how they rate it follows those tastes, so the tasks carry learnable signal. The files
keep the real dumps' quirks (a repeated metadata row, reviewed items without metadata, relations pointing outside
the catalogue) so the default build exercises those paths too.

The same kind of shop at any size: ``synthetic_dump.write_dump``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import time
from collections import Counter

import fsspec
from pydantic import Field

from recfound.config import Config
from recfound.data.synthetic_shop import END, ID_CHARS, OPENINGS, SHOP, START, SUMMARIES, Item, shop_item


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


def _items(cfg: SyntheticConfig, rng: random.Random) -> list[Item]:
    names = list(SHOP)
    out: list[Item] = []
    ids: set[str] = set()
    titles: set[str] = set()
    while len(out) < cfg.items:
        category = names[len(out) % len(names)]
        noun = rng.choice(sorted(SHOP[category].nouns))
        item_id = "B0" + "".join(rng.choices(ID_CHARS, k=8))
        item = shop_item(rng, item_id, category, noun)
        while item.title in titles:
            item.series += 1
        if item_id not in ids:
            ids.add(item_id)
            titles.add(item.title)
            out.append(item)
    return out


def _reviews(cfg: SyntheticConfig, items: list[Item], rng: random.Random) -> list[dict]:
    names = list(SHOP)
    by_category = {c: [i for i in items if i.category == c] for c in names}
    popularity = {i.item_id: 1 / (rank % 40 + 1) ** 0.8 for rank, i in enumerate(rng.sample(items, len(items)))}
    out = []
    for u in range(cfg.users):
        user = f"U{u:05d}" + "".join(rng.choices("ABCDEFGHJKLMNPQRSTUVWXYZ", k=6))
        taste = [rng.gammavariate(0.4, 1) + 1e-3 for _ in names]
        stamp = rng.randrange(START, END)
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
            summary = rng.choice(SUMMARIES[rating]).format(**words)
            text = f"{OPENINGS[rating].format(**words)} I bought it {SHOP[item.category].use}."
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


def _meta(items: list[Item], reviews: list[dict], rng: random.Random) -> list[dict]:
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
        use = SHOP[item.category].use
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


def _queries(cfg: SyntheticConfig, items: list[Item], rng: random.Random) -> list[dict]:
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

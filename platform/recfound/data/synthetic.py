"""A small synthetic shop in the Amazon 2018 raw format, so the pipeline runs end to end with no download.

Users have latent tastes over categories; what they buy and how they rate it follows those tastes, so the
tasks carry learnable signal. The files keep the real dumps' quirks (a repeated metadata row, reviewed items
without metadata, relations pointing outside the catalogue) so the default build exercises those paths too.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import fsspec
from pydantic import Field

from recfound.config import Config

class _Category(NamedTuple):
    brands: list[str]
    nouns: dict[str, list[str]]  # product noun -> its sizes/variants
    adjectives: list[str]
    use: str


_SHOP = {
    "Kitchen": _Category(
        ["Copperline", "Hearthwell", "Saucier"],
        {"skillet": ["10-inch", "12-inch"], "kettle": ["1.7 L", "1 L"], "blender": ["1000 W", "48 oz"],
         "chef knife": ["8-inch", "6-inch"], "stock pot": ["8 qt", "12 qt"]},
        ["cast iron", "stainless steel", "non-stick", "ceramic", "professional"], "for everyday cooking"),
    "Outdoors": _Category(
        ["Northpeak", "Trailborn", "Ridgeway"],
        {"tent": ["2-person", "4-person"], "backpack": ["40 L", "65 L"], "headlamp": ["300 lumens", "rechargeable"],
         "sleeping bag": ["20 F", "3-season"], "water filter": ["straw", "gravity 4 L"]},
        ["lightweight", "waterproof", "ultralight", "insulated", "rugged"], "for camping and hiking"),
    "Electronics": _Category(
        ["Voltaic", "Lumina", "Sonorix"],
        {"headphones": ["over-ear", "black"], "speaker": ["20 W", "waterproof"], "charger": ["65 W", "USB-C"],
         "keyboard": ["mechanical", "full size"], "webcam": ["1080p", "4K"]},
        ["wireless", "bluetooth", "portable", "compact", "low-latency"], "for work and travel"),
    "Beauty": _Category(
        ["Velvetine", "Bloomcraft", "Puregleam"],
        {"face serum": ["30 ml", "2-pack"], "shampoo": ["500 ml", "travel size"], "lip balm": ["4-pack", "tinted"],
         "moisturizer": ["50 ml", "SPF 30"], "hair oil": ["100 ml", "travel size"]},
        ["hydrating", "organic", "fragrance-free", "vitamin C", "argan"], "for a daily routine"),
    "Toys": _Category(
        ["Playforge", "Tinkertot", "Brightblocks"],
        {"puzzle": ["500 pieces", "1000 pieces"], "building set": ["250 pieces", "ages 6+"],
         "plush bear": ["12-inch", "brown"], "race car": ["1:24 scale", "ages 3+"],
         "board game": ["2-6 players", "family edition"]},
        ["wooden", "magnetic", "educational", "classic", "colorful"], "for kids and families"),
    "Garden": _Category(
        ["Greenhaven", "Rootwise", "Petalworks"],
        {"hose": ["50 ft", "100 ft"], "pruning shears": ["8-inch", "bypass"], "planter": ["large", "set of 3"],
         "watering can": ["2 gallon", "1 gallon"], "seed kit": ["12 varieties", "herbs"]},
        ["expandable", "heavy-duty", "self-watering", "ergonomic", "heirloom"], "for the yard and garden"),
}  # fmt: skip
_SUMMARIES = {
    5: ["Love this {noun}", "Best {noun} I have owned", "Excellent {adj} {noun}", "Exactly what I needed"],
    4: ["Very good {noun}", "Solid {noun} for the price", "Works well, would buy again"],
    3: ["Decent {noun}", "It's okay", "Average {noun}, nothing special"],
    2: ["Not great", "Disappointing {noun}", "Expected more from {brand}"],
    1: ["Broke after a week", "Do not buy this {noun}", "Terrible {noun}"],
}
_OPENINGS = {
    5: "I use this {noun} all the time and it is fantastic.", 4: "This {noun} does its job well.",
    3: "The {noun} is fine but unremarkable.", 2: "I had problems with this {noun} early on.",
    1: "This {noun} failed almost immediately.",
}  # fmt: skip
_START, _END = 1388534400, 1498867200  # 2014-01-01 .. 2017-07-01: first reviews; later ones follow


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
        item_id = "B0" + "".join(rng.choices("0123456789ABCDEFGHJKLMNPQRSTUVWXYZ", k=8))
        item = _Item(item_id, category, rng.choice(shop.brands), noun, rng.choice(shop.adjectives),
                     rng.choice(shop.nouns[noun]), rng.gauss(0, 0.6))  # fmt: skip
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
                i for i in items if i.item_id not in owned]  # fmt: skip
            item = rng.choices(pool, weights=[popularity[i.item_id] for i in pool])[0]
            owned.add(item.item_id)
            affinity = taste[names.index(item.category)] / max(taste)
            rating = min(5, max(1, round(1.5 + 3 * affinity + item.quality + rng.gauss(0, 0.6))))
            words = {"noun": item.noun, "adj": item.adj, "brand": item.brand}
            summary = rng.choice(_SUMMARIES[rating]).format(**words)
            text = f"{_OPENINGS[rating].format(**words)} I bought it {_SHOP[item.category].use}."
            out.append({"overall": float(rating), "verified": True, "reviewerID": user, "asin": item.item_id,
                        "reviewText": text, "summary": summary, "unixReviewTime": stamp,
                        "reviewTime": time.strftime("%m %d, %Y", time.gmtime(stamp))})  # fmt: skip
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
        out.append({
            "asin": item.item_id, "title": item.title, "brand": item.brand, "main_cat": item.category,
            "category": [item.category, item.noun.title()],
            "description": [f"This {item.adj} {item.noun} from {item.brand} is made {use}.", ""],
            "feature": [f"{item.adj.capitalize()} design", item.extra],
            "also_buy": also_buy + ["B0OUTSIDE01"],  # real dumps point outside the 5-core catalogue too
            "also_view": rng.sample(peers, min(3, len(peers))), "price": "", "similar_item": "",
        })  # fmt: skip
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
        out += [{"query": query, "product_id": i.item_id, "esci_label": label, "product_title": i.title,
                 "product_brand": i.brand} for i, label in judged]  # fmt: skip
    return out


def _gzip_jsonl(rows: list[dict]) -> bytes:
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return gzip.compress(text, mtime=0)  # mtime=0: same rows, same bytes


def write_catalogue(cfg: SyntheticConfig, raw_dir: str) -> dict[str, str]:
    """Write reviews, metadata (and queries) under ``raw_dir``; returns their URLs keyed like BuildConfig."""
    rng = random.Random(cfg.seed)
    items = _items(cfg, rng)
    reviews = _reviews(cfg, items, rng)
    files = {"reviews": ("reviews_Synthetic_5.json.gz", _gzip_jsonl(reviews)),
             "meta": ("meta_Synthetic.json.gz", _gzip_jsonl(_meta(items, reviews, rng)))}  # fmt: skip
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

"""The synthetic shop's vocabulary (categories, brands, products, review phrasing) and its item, shared by the small
catalogue (``synthetic.write_catalogue``) and the dump of any size (``synthetic_dump.write_dump``)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple


class Category(NamedTuple):
    brands: list[str]
    nouns: dict[str, list[str]]  # product noun -> its sizes/variants
    adjectives: list[str]
    use: str


SHOP = {
    "Kitchen": Category(
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
    "Outdoors": Category(
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
    "Electronics": Category(
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
    "Beauty": Category(
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
    "Toys": Category(
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
    "Garden": Category(
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
SUMMARIES = {
    5: ["Love this {noun}", "Best {noun} I have owned", "Excellent {adj} {noun}", "Exactly what I needed"],
    4: ["Very good {noun}", "Solid {noun} for the price", "Works well, would buy again"],
    3: ["Decent {noun}", "It's okay", "Average {noun}, nothing special"],
    2: ["Not great", "Disappointing {noun}", "Expected more from {brand}"],
    1: ["Broke after a week", "Do not buy this {noun}", "Terrible {noun}"],
}
OPENINGS = {
    5: "I use this {noun} all the time and it is fantastic.",
    4: "This {noun} does its job well.",
    3: "The {noun} is fine but unremarkable.",
    2: "I had problems with this {noun} early on.",
    1: "This {noun} failed almost immediately.",
}
START, END = 1388534400, 1498867200  # 2014-01-01 .. 2017-07-01: first reviews; later ones follow
ID_CHARS = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"  # ASIN-like: no I or O


@dataclass
class Item:
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


def shop_item(rng: random.Random, item_id: str, category: str, noun: str, series: int = 0) -> Item:
    """An item of ``category`` named ``noun``, its brand, adjective, extra words and hidden quality drawn from ``rng``
    in the one order both generators (the bundled catalogue and the large dump) keep for byte-identical output."""
    shop = SHOP[category]
    words = rng.choice(shop.brands), noun, rng.choice(shop.adjectives), rng.choice(shop.nouns[noun])
    return Item(item_id, category, *words, rng.gauss(0, 0.6), series)

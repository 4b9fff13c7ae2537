"""Serving building blocks without Ray: the test engine, the item index (exact and IVF), the GRM engine. (Auth is
in test_serve_auth.py, the Model replica run in process in test_serve_engine_replica.py.)

Also home of ``FakeEngine`` and the tiny artifact/catalogue writers the other serving tests publish with: the
fake is named in a version's ``version.json`` as ``test_serve_engine:FakeEngine``, so Serve replicas import it
from this file (the tests put ``tests/`` on their PYTHONPATH).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recfound.artifacts import MANIFEST, hash_tree
from recfound.data.templates import TEMPLATE_VERSION, item_text
from recfound.model.formats import Side
from recfound.serving.engine import ENGINE_KEY, Engine, load_engine
from recfound.serving.index import (
    ExactSearch,
    ItemIndex,
    IVFSearch,
    SearchConfig,
    SearchKind,
    build_item_index,
    build_search,
    text_meta,
    user_text,
)
from recfound.serving.publish import publish
from recfound.serving.registry import resolve
from recfound.tasks import ALL_TASKS

FAKE_ENGINE = "test_serve_engine:FakeEngine"
FAKE_CONFIG = "fake_model.json"
SLOW_PROMPT = "[slow]"
"""A prompt starting with this makes FakeEngine.generate take SLOW_S: a long generation, for timeouts and overload."""
SLOW_S = 3.0
CATALOGUE = [
    ("i1", "red running shoes", ["Shoes"], "Acme"),
    ("i2", "blue running shoes", ["Shoes"], "Acme"),
    ("i3", "red wool socks", ["Socks"], "Knit"),
    ("i4", "espresso coffee beans", ["Coffee"], "Bean"),
    ("i5", "ceramic coffee mug", ["Kitchen"], "Clay"),
    ("i6", "stainless steel kettle", ["Kitchen"], "Steel"),
]


class FakeEngine:
    """Deterministic GRM stand-in: hashed bag-of-words vectors (shared words -> similar), echoing generation.

    Its settings live in the artifact (``fake_model.json``), so corrupting the artifact corrupts the engine.
    """

    def __init__(self, version_dir: str):
        root = Path(version_dir)
        cfg = json.loads((root / FAKE_CONFIG).read_text())
        self.version = json.loads((root / "version.json").read_text())["version"]
        self.dim, self.context_length = cfg["dim"], cfg["context_length"]
        self.tasks = tuple(cfg["tasks"])
        time.sleep(cfg["load_delay_s"])  # a real model takes a while to load; hot swaps must not wait for it

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(t.split()) for t in texts]

    def embed(self, task: str, texts: list[str], instruction: str, side: Side) -> np.ndarray:
        return fake_vectors(texts, self.dim)

    def generate(self, task: str, prompts: list[str], max_tokens: int, temperature: float) -> list[str]:
        if any(p.startswith(SLOW_PROMPT) for p in prompts):
            time.sleep(SLOW_S)
        return [self._echo(task, p, max_tokens) for p in prompts]

    def stream(
        self, task: str, prompt: str, max_tokens: int, temperature: float, cancelled: threading.Event
    ) -> Iterator[str]:
        """``generate``'s text word by word; a slow prompt spreads its words over SLOW_S."""
        pieces = re.findall(r"\s*\S+", self._echo(task, prompt, max_tokens))
        for piece in pieces:
            if cancelled.is_set():
                return
            if prompt.startswith(SLOW_PROMPT):
                time.sleep(SLOW_S / len(pieces))
            yield piece

    def _echo(self, task: str, prompt: str, max_tokens: int) -> str:
        return " ".join(f"{self.version} {task} says {prompt}".split()[:max_tokens])

    def choice_scores(self, task: str, prompts: list[str], choices: list[str]) -> np.ndarray:
        """How many words each choice shares with the prompt."""
        words = [set(re.findall(r"[a-z0-9]+", p.lower())) for p in prompts]
        return np.array(
            [[len(w & set(re.findall(r"[a-z0-9]+", c.lower()))) for c in choices] for w in words], dtype=np.float32
        )


def fake_vectors(texts: list[str], dim: int) -> np.ndarray:
    out = np.full((len(texts), dim), 1e-3, dtype=np.float32)
    for row, text in enumerate(texts):
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % dim] += 1.0
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def write_manifest(model_dir: Path) -> None:
    """What the merge job writes: the SHA-256 of every file of the artifact."""
    files = hash_tree(model_dir, skip={MANIFEST})
    (model_dir / MANIFEST).write_text(json.dumps({"files": files, "method": "ties"}))


def make_artifact(
    model_dir: Path,
    dim: int = 64,
    context_length: int = 64,
    load_delay_s: float = 0.0,
    tasks: tuple[str, ...] = ALL_TASKS,
) -> Path:
    """A merged-model artifact the fake engine loads: its config (``tasks``: what it was trained on) plus some
    'weights', with a manifest."""
    (model_dir / "weights").mkdir(parents=True)
    cfg = {"dim": dim, "context_length": context_length, "load_delay_s": load_delay_s, "tasks": list(tasks)}
    (model_dir / FAKE_CONFIG).write_text(json.dumps(cfg))
    (model_dir / "weights" / "adapter.bin").write_bytes(bytes(range(256)) * 16)
    write_manifest(model_dir)
    return model_dir


def make_dataset(data_dir: Path) -> Path:
    """The two files publish reads from a built dataset: items.parquet and the manifest."""
    data_dir.mkdir(parents=True)
    ids, titles, texts, categories, brands = zip(
        *[(i, t, item_text(t, c, b), c[0], b) for i, t, c, b in CATALOGUE], strict=True
    )
    table = {"item_id": ids, "title": titles, "text": texts, "category": categories, "brand": brands}
    pq.write_table(pa.table({k: list(v) for k, v in table.items()}), data_dir / "items.parquet")
    (data_dir / "manifest.json").write_text(
        json.dumps({"template_version": TEMPLATE_VERSION, "config": {"max_history": 3}})
    )
    return data_dir


def publish_fake(model_dir: Path, data_dir: Path, registry: str, engine: str = FAKE_ENGINE) -> str:
    meta = {ENGINE_KEY: engine, **text_meta(json.loads((data_dir / "manifest.json").read_text()))}
    return publish(str(model_dir), registry, partial(build_item_index, items_url=str(data_dir / "items.parquet")), meta)


@pytest.fixture
def published(tmp_path: Path) -> str:
    registry = str(tmp_path / "registry")
    publish_fake(make_artifact(tmp_path / "model"), make_dataset(tmp_path / "data"), registry)
    return resolve(registry)


def test_version_loads_its_named_engine_and_index(published: str) -> None:
    engine = load_engine(published)
    assert isinstance(engine, Engine) and engine.version == "v1"
    index = ItemIndex.load(published, SearchConfig())
    assert index.item_ids == [c[0] for c in CATALOGUE]
    assert isinstance(index.searches["q2i"], ExactSearch)  # auto: a 6-item catalogue is searched exactly
    [query] = engine.embed("q2i", ["coffee beans"], "", Side.QUERY)
    hits = index.search("q2i", query, k=3)
    assert index.item_ids[hits[0][0]] == "i4"
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    assert "i4" not in [index.item_ids[p] for p, _ in index.search("q2i", query, k=6, exclude=[3])]


def test_bad_engine_factory_is_named(published: str) -> None:
    meta_path = Path(published) / "version.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, ENGINE_KEY: "test_serve_engine:Nope"}))
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        load_engine(published)


def clustered(n: int, d: int = 16, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``clusters`` centres: the structure IVF's lists follow."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def items() -> np.ndarray:
    return clustered(2000)


def test_ivf_probing_every_list_is_exact_search(items: np.ndarray) -> None:
    exact = ExactSearch(items)
    ivf = IVFSearch(items, nlist=20, nprobe=20, seed=0)
    for row in range(0, len(items), 97):
        assert [p for p, _ in ivf.search(items[row] + 0.1, 10)] == [p for p, _ in exact.search(items[row] + 0.1, 10)]
    assert np.allclose(ivf.rows([5, 3]), items[[5, 3]])  # /v1/rank's rows come back through the direct map


def test_ivf_finds_each_item_as_its_own_nearest_neighbour(items: np.ndarray) -> None:
    ivf = build_search(items, SearchConfig(kind=SearchKind.IVF, nprobe=2))
    assert isinstance(ivf, IVFSearch) and ivf.nlist == 44  # sqrt(items)
    assert IVFSearch.clamp_nlist(100, 50) == 2 and IVFSearch.clamp_nlist(10, 50) == 1  # >= 39 items per list
    found = [ivf.search(items[row], 1)[0][0] == row for row in range(0, len(items), 7)]
    assert np.mean(found) >= 0.95


@pytest.mark.parametrize("kind", [SearchKind.EXACT, SearchKind.IVF])
def test_exclusions_are_honoured(items: np.ndarray, kind: SearchKind) -> None:
    search = build_search(items, SearchConfig(kind=kind, nprobe=1000))
    top = [p for p, _ in search.search(items[0], 10)]
    kept = [p for p, _ in search.search(items[0], 10, exclude=top[:5])]
    assert top[0] == 0 and not set(kept) & set(top[:5]) and kept[:5] == top[5:]
    assert len(search.search(items[0], len(items), exclude=range(len(items) - 3))) == 3


def test_auto_is_exact_below_ivf_min_items_and_ivf_from_there(items: np.ndarray) -> None:
    config = SearchConfig(ivf_min_items=len(items))
    assert config.kind_for(len(items) - 1) is SearchKind.EXACT and config.kind_for(len(items)) is SearchKind.IVF
    assert isinstance(build_search(items[:-1], config), ExactSearch)
    assert isinstance(build_search(items, config), IVFSearch)
    assert SearchConfig().kind is SearchKind.AUTO and SearchConfig(kind="exact").kind_for(10**9) is SearchKind.EXACT


def test_ivf_builds_are_deterministic(items: np.ndarray) -> None:
    """Replicas build their index independently: the same seed must give the same answers everywhere."""
    a, b = (IVFSearch(items, nlist=None, nprobe=3, seed=7) for _ in range(2))
    queries = clustered(30, seed=1)
    assert [a.search(q, 10) for q in queries] == [b.search(q, 10) for q in queries]


def test_user_text_keeps_the_most_recent_titles_in_order() -> None:
    assert user_text(["a", "b", "c", "d"], max_history=2) == "1. c\n2. d"


def test_template_version_mismatch_refuses_publish() -> None:
    with pytest.raises(ValueError, match="templates"):
        text_meta({"template_version": "0"})


def test_grm_engine_serves_a_tiny_published_adapter(tmp_path: Path) -> None:
    """The real engine end to end: a tiny GRM in the merge job's layout, published, indexed and queried."""
    from recfound.model.backbone import BackboneConfig
    from recfound.model.grm import GRM

    model_dir = tmp_path / "merged"
    backbone = BackboneConfig(name="tiny", max_query_len=160, max_passage_len=192, max_generative_len=256)
    GRM.build(backbone).save_pretrained(str(model_dir / "adapter"))
    write_manifest(model_dir)
    registry = str(tmp_path / "registry")
    data_dir = make_dataset(tmp_path / "data")
    publish_fake(model_dir, data_dir, registry, engine="recfound.serving.engine:GRMEngine")
    version_dir = resolve(registry)
    engine = load_engine(version_dir)
    assert engine.context_length == 256 and engine.count_tokens(["abc"])[0] >= 3
    index = ItemIndex.load(version_dir, SearchConfig())
    [query] = engine.embed("i2i", [index.texts[0]], "Represent the product", Side.QUERY)
    assert np.isclose(np.linalg.norm(query), 1.0, atol=1e-4)
    assert len(index.search("i2i", query, k=3, exclude=[0])) == 3
    [text] = engine.generate("item_profile", ["Describe: red shoes"], max_tokens=4, temperature=0.0)
    assert isinstance(text, str)
    choices = ["positive", "negative", "neutral"]
    streamed = "".join(engine.stream("item_profile", "Describe: red shoes", 6, 0.0, threading.Event()))
    assert streamed == engine.generate("item_profile", ["Describe: red shoes"], max_tokens=6, temperature=0.0)[0]
    cancelled = threading.Event()
    cancelled.set()
    assert len("".join(engine.stream("item_profile", "Describe: red shoes", 50, 0.0, cancelled))) < len(streamed) + 8
    scores = engine.choice_scores("sentiment_analysis", ["Great shoes", "Awful socks"], choices)
    expected = engine.model.choice_scores(["Great shoes", "Awful socks"], choices, "sentiment_analysis")
    assert scores.dtype == np.float32 and np.allclose(scores, expected.numpy())

"""The compact deployment served: an int8 embedding export (jobs/export.py) published and answered by the Model
replica in process, and every task the version does not serve refused as a client error, not a 500."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest
from test_export import make_merged
from test_serve_engine import make_dataset

from recfound.merge.export import ExportConfig, export
from recfound.merge.exported import load_export
from recfound.model.backbone import BackboneConfig
from recfound.model.formats import Side
from recfound.serving.engine import ExportEngine, load_engine
from recfound.serving.errors import ApiError
from recfound.serving.model import ModelReplica
from recfound.serving.registry import resolve
from recfound.serving.schemas import RecommendRequest

pytestmark = pytest.mark.usefixtures("replica_context")
REPO = Path(__file__).resolve().parents[1]
BYTE_BUDGETS = BackboneConfig(name="tiny", max_query_len=160, max_passage_len=192, max_generative_len=256)
"""The byte tokenizer spends a token per character: the serving instructions need these budgets."""


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(registry, export dir): q2i exported int8 from a tiny merged model, published with jobs/publish.py's
    defaults (the export engine is chosen from the manifest)."""
    import importlib.util

    root = tmp_path_factory.mktemp("serve-export")
    merged = make_merged(root, BYTE_BUDGETS)
    out = export(ExportConfig(model=str(merged), task="q2i", out=str(root / "q2i-int8"), quantize="int8"))
    spec = importlib.util.spec_from_file_location("publish_job", REPO / "jobs" / "publish.py")
    job = sys.modules["publish_job"] = importlib.util.module_from_spec(spec)  # pydantic resolves its annotations there
    spec.loader.exec_module(job)
    registry = str(root / "registry")
    assert job.main([f"model={out}", f"data={make_dataset(root / 'data')}", f"registry={registry}"]) == "v1"
    return registry, out


def test_an_export_is_published_with_its_own_engine(published: tuple[str, Path]) -> None:
    registry, out = published
    engine = load_engine(resolve(registry, "v1"))
    assert isinstance(engine, ExportEngine) and engine.tasks == ("q2i",)
    texts = ["red running shoes", "a mug for coffee"]
    assert np.array_equal(engine.embed("q2i", texts, "Find it", Side.QUERY), load_export(out).embed(texts, "Find it"))


def test_the_replica_serves_the_exported_task_and_refuses_the_rest(
    published: tuple[str, Path], loop: asyncio.Runner
) -> None:
    registry, out = published
    replica = ModelReplica(registry, {})

    async def calls() -> tuple:
        await replica.reconfigure({"version": "v1"})
        embedded = await replica.embed("q2i", ["espresso coffee beans"])
        hits = await replica.recommend(RecommendRequest(task="q2i", query="coffee", k=2))
        refused = []
        for call in (
            replica.embed("u2i", ["x"]),
            replica.generate("item_profile", ["x"], 4, 0.0),
            replica.recommend(RecommendRequest(task="i2i", item_id="i1", k=2)),
        ):
            with pytest.raises(ApiError) as err:
                await call
            refused.append((err.value.status, err.value.code, err.value.param))
        return embedded, hits, refused

    embedded, hits, refused = loop.run(calls())
    instruction = replica._live.instructions["q2i"]["query"]
    assert np.array_equal(embedded.vectors, load_export(out).embed(["espresso coffee beans"], instruction))
    assert len(hits.items) == 2 and hits.version == "v1"
    assert refused == [
        (404, "model_not_found", "model"),
        (404, "model_not_found", "model"),
        (400, "unsupported_value", "task"),
    ]

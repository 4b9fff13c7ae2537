"""Task tables as Ray Data streams, on a local one-CPU Ray."""

from __future__ import annotations

import pytest
import ray
from data_fixtures import SMALL

from recfound.data.builder import BuildConfig, build
from recfound.data.task_datasets import task_datasets
from recfound.tasks import EMBEDDING_COLUMNS, GENERATIVE_COLUMNS

pytestmark = pytest.mark.slow  # starts a local Ray: not in `make test-fast`


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_task_datasets(local_ray, tmp_path):
    out = tmp_path / "data"
    manifest = build(BuildConfig(out=str(out), synthetic=SMALL.model_copy(update={"queries": 0}), max_rows_per_task=8))
    streams = task_datasets(str(out), "valid", ["u2i", "sentiment_analysis"])
    assert list(streams) == ["u2i", "sentiment_analysis"]
    assert streams["u2i"].count() == manifest["tasks"]["u2i"]["valid"]
    assert tuple(streams["u2i"].take(1)[0]) == EMBEDDING_COLUMNS
    assert streams["sentiment_analysis"].schema().names == list(GENERATIVE_COLUMNS)
    with pytest.raises(FileNotFoundError, match="task 'query_rewriting'"):
        task_datasets(str(out), "train", ["u2i", "query_rewriting"])
    with pytest.raises(ValueError, match="unknown task"):
        task_datasets(str(out), "train", ["u2x"])

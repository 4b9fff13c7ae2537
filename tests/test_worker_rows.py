"""A small task's rows, read and tokenised on the training worker itself, are exactly the rows its Ray Data stream
gave that worker before (so a run resumes across the change, and ranks still hold disjoint, complete shares)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray
from data_fixtures import small_build

from recfound.config import load_config
from recfound.data.task_datasets import task_dataset
from recfound.train.batches import Rows, tokenize, worker_rows
from recfound.train.config import TrainConfig
from recfound.train.streams import concat_rows

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
pytestmark = pytest.mark.slow  # starts a local Ray: not in `make test-fast`


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # as the trainer sets it
    yield
    ray.shutdown()


def _streamed(data: str, task: str, backbone: dict) -> Rows:
    """The task's rows as the trainer's Ray Data pipeline delivered them (``read_parquet`` + ``map_batches``)."""
    ds = task_dataset(data, "train", task).map_batches(
        tokenize, batch_size=64, fn_kwargs={"backbone": backbone, "task": task}
    )
    return concat_rows(list(ds.iter_batches(batch_size=4096, batch_format="numpy")))


def test_worker_rows_are_the_ray_data_rows_of_that_rank(local_ray, tmp_path: Path) -> None:
    small_build(tmp_path)
    backbone = load_config(TrainConfig, str(CONFIGS / "tiny.yaml")).model.backbone.model_dump()
    for task in ("u2i", "sentiment_analysis"):
        streamed = _streamed(str(tmp_path), task, backbone)
        for rank in range(2):
            mine = worker_rows(str(tmp_path), task, backbone, rank, 2)
            assert set(mine) == set(streamed), task
            for key, want in streamed.items():
                got = mine[key]
                assert got.shape == want[rank::2].shape and got.dtype.kind == want.dtype.kind, (task, key)
                assert np.array_equal(got, want[rank::2]), (task, key, rank)
    with pytest.raises(RuntimeError, match="task u2i: no training rows for worker 5000 of 5001"):
        worker_rows(str(tmp_path), "u2i", backbone, 5000, 5001)

"""Label balancing (``batch.label_balance``): how often a classification row is used, by how rare its answer is."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recfound.config import ConfigError, load_config
from recfound.tasks import task_path
from recfound.train.balance import label_repeats, repeat_counts, repeat_rows, task_repeats
from recfound.train.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_repeats_flatten_the_label_counts_by_the_power() -> None:
    counts = {"very positive": 80, "positive": 20, "very negative": 5}
    assert label_repeats(counts, 1.0) == {"positive": 4, "very negative": 16, "very positive": 1}
    assert label_repeats(counts, 0.5) == {"positive": 2, "very negative": 4, "very positive": 1}
    assert label_repeats(counts, 0.0) == {"positive": 1, "very negative": 1, "very positive": 1}
    assert label_repeats({}, 1.0) == {}


def test_rows_are_repeated_by_their_answer_copies_side_by_side() -> None:
    batch = {"prompt": np.array(["p0", "p1", "p2"], dtype=object), "response": np.array(["a", "b", "c"], dtype=object)}
    out = repeat_rows(batch, {"a": 1, "b": 3})
    assert out["prompt"].tolist() == ["p0", "p1", "p1", "p1", "p2"]
    assert out["response"].tolist() == ["a", "b", "b", "b", "c"]
    assert repeat_counts(["c", "b"], {"b": 3}).tolist() == [1, 3]  # an answer not named is used once


def _table(root: Path, task: str, answers: list[str]) -> None:
    path = root / task_path(task, "train")
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(len(answers))], "response": answers}), path)


def test_only_classification_tasks_with_unequal_labels_are_repeated(tmp_path: Path) -> None:
    _table(tmp_path, "sentiment_analysis", ["very positive"] * 6 + ["negative"] * 2)
    _table(tmp_path, "product_matching", ["yes", "no"] * 3)
    _table(tmp_path, "user_profile", ["a long profile"] * 3 + ["another"])
    tasks = ["sentiment_analysis", "product_matching", "user_profile"]
    assert task_repeats(str(tmp_path), tasks, 1.0) == {"sentiment_analysis": {"negative": 3, "very positive": 1}}
    assert task_repeats(str(tmp_path), tasks, 0.0) == {}


def test_label_balance_is_a_power_between_0_and_1() -> None:
    tiny = str(CONFIGS / "tiny.yaml")
    assert load_config(TrainConfig, tiny, ["batch.label_balance=0.5"]).batch.label_balance == 0.5
    with pytest.raises(ConfigError, match="label_balance"):
        load_config(TrainConfig, tiny, ["batch.label_balance=2"])

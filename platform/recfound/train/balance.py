"""Label balancing: a classification task's training rows repeated by how rare their answer is.

A classification task trains on the data's label frequencies, and a small model learns that prior first: on the
Magazine slice 65 % of the sentiment rows answer "very positive", and the trained model answered it for every
test review although its scores ranked the other labels well (per-label AUC up to 0.90, docs/evaluation.md).
Repeating each row ``(majority count / its label's count) ** power`` times (rounded, at least once) moves the
prior the model sees toward uniform: ``power`` 1 equalises the labels, 0.5 halves their skew in log space, 0
leaves the data as built. The repeats are applied to the raw rows, before tokenising, identically in the Ray Data
stream (``repeat_rows`` in ``map_batches``) and in the rows a worker reads itself (``batches.worker_rows``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from recfound.data.templates import CLASS_LABELS
from recfound.tasks import task_path

Repeats = dict[str, int]
"""Answer -> how many times each training row with that answer is used per epoch (answers not named: once)."""


def label_repeats(counts: dict[str, int], power: float) -> Repeats:
    """Each label's repeat factor from the labels' row counts (see the module doc)."""
    top = max(counts.values(), default=0)
    return {label: max(1, round((top / n) ** power)) for label, n in sorted(counts.items()) if n}


def task_repeats(data: str, tasks: Sequence[str], power: float) -> dict[str, Repeats]:
    """The repeats of every classification task among ``tasks`` whose labels are unequal, read off its training
    table's answers (one column); {} for ``power`` 0."""
    if not power:
        return {}
    found = {}
    for task in tasks:
        if task not in CLASS_LABELS:
            continue
        fs, path = url_to_fs(f"{data.rstrip('/')}/{task_path(task, 'train')}")
        answers = pq.read_table(path, columns=["response"], filesystem=fs).column("response").to_pylist()
        repeats = label_repeats(Counter(answers), power)
        if any(n > 1 for n in repeats.values()):
            found[task] = repeats
    return found


def repeat_counts(answers: Sequence[str], repeats: Repeats) -> np.ndarray:
    """How many times each row is used, by its answer."""
    return np.array([repeats.get(a, 1) for a in answers], dtype=np.int64)


def repeat_rows(batch: dict[str, np.ndarray], repeats: Repeats) -> dict[str, np.ndarray]:
    """``map_batches`` function: each raw row repeated by its answer's factor, copies side by side."""
    counts = repeat_counts(list(batch["response"]), repeats)
    return {key: np.repeat(values, counts, axis=0) for key, values in batch.items()}

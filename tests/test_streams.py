"""Per-task streams: variable rows per step, epochs restart, resume skips what was consumed."""

from collections.abc import Iterator

import numpy as np

from recfound.train.streams import TaskStream


class ListShard:
    def __init__(self, n: int) -> None:
        self.rows = np.arange(n)
        self.opened = 0

    def iter_batches(self, *, batch_size: int, batch_format: str, prefetch_batches: int) -> Iterator[dict]:
        self.opened += 1
        for i in range(0, len(self.rows), batch_size):
            yield {"x": self.rows[i : i + batch_size]}


def test_take_crosses_chunks_and_epochs() -> None:
    shard = ListShard(10)
    stream = TaskStream(shard, chunk=4)
    assert stream.take(3)["x"].tolist() == [0, 1, 2]
    assert stream.take(6)["x"].tolist() == [3, 4, 5, 6, 7, 8]
    assert stream.take(4)["x"].tolist() == [9, 0, 1, 2]
    assert stream.state() == {"epoch": 1, "position": 3}
    assert shard.opened == 1  # a 10-row epoch fits the cache: epoch 1 replays it from memory


def test_resume_from_state_continues_exactly() -> None:
    first = TaskStream(ListShard(10), chunk=4)
    first.take(7)
    resumed = TaskStream(ListShard(10), chunk=4, **first.state())
    assert resumed.take(5)["x"].tolist() == first.take(5)["x"].tolist() == [7, 8, 9, 0, 1]


def test_an_epoch_larger_than_the_cache_streams_again() -> None:
    shard = ListShard(10)
    stream = TaskStream(shard, chunk=4, cache_rows=8)
    assert stream.take(25)["x"].tolist() == [*range(10), *range(10), 0, 1, 2, 3, 4]
    assert shard.opened == 3 and stream.state() == {"epoch": 2, "position": 5}


def test_a_cached_epoch_resumes_exactly() -> None:
    first = TaskStream(ListShard(10), chunk=4)
    first.take(17)  # cached after epoch 0
    resumed = TaskStream(ListShard(10), chunk=4, **first.state())
    assert resumed.take(8)["x"].tolist() == first.take(8)["x"].tolist() == [7, 8, 9, 0, 1, 2, 3, 4]


def test_prime_fetches_ahead_without_consuming() -> None:
    shard = ListShard(10)
    stream = TaskStream(shard, chunk=4)
    stream.prime()
    assert shard.opened == 1 and stream.state() == {"epoch": 0, "position": 0}
    assert stream.take(2)["x"].tolist() == [0, 1]

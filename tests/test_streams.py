"""Per-task streams: variable rows per step, epochs restart, resume skips what was consumed."""

import tracemalloc
from collections.abc import Iterator

import numpy as np

from recfound.train.streams import MemoryShard, TaskStream, small_tasks


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


def _epochs(stream: TaskStream, n: int, epochs: int) -> list[list[int]]:
    return [stream.take(n)["x"].tolist() for _ in range(epochs)]


def test_shuffle_reorders_every_epoch_from_seed_and_epoch() -> None:
    def stream(seed: int) -> TaskStream:
        return TaskStream(ListShard(40), chunk=8, seed=seed, shuffle_window=64)

    a, b = _epochs(stream(3), 40, 3), _epochs(stream(3), 40, 3)
    assert a == b  # a rerun with the same seed draws the same order
    assert all(sorted(epoch) == list(range(40)) for epoch in a)  # each epoch is a permutation of the shard
    assert len({tuple(epoch) for epoch in a}) == 3 and a[0] != list(range(40))  # and a new one every epoch
    assert _epochs(stream(4), 40, 1)[0] != a[0]


def test_shuffle_window_bounds_how_far_a_row_moves() -> None:
    order = TaskStream(ListShard(40), chunk=8, seed=0, shuffle_window=10).take(40)["x"].tolist()
    assert [sorted(order[i : i + 10]) for i in range(0, 40, 10)] == [list(range(i, i + 10)) for i in range(0, 40, 10)]
    assert order != list(range(40))
    assert TaskStream(ListShard(10), chunk=4).take(10)["x"].tolist() == list(range(10))  # 0: build order


def test_shuffled_streams_resume_exactly_from_memory_or_from_the_shard() -> None:
    for cache_rows in (4096, 8):  # the epoch replayed from memory, and streamed from the shard again
        first = TaskStream(ListShard(20), chunk=4, seed=7, shuffle_window=6, cache_rows=cache_rows)
        first.take(33)
        resumed = TaskStream(ListShard(20), chunk=4, seed=7, shuffle_window=6, cache_rows=cache_rows, **first.state())
        assert resumed.take(30)["x"].tolist() == first.take(30)["x"].tolist()


class ViewShard:
    """A large shard whose chunks are views of one array allocated up front: reading it allocates nothing."""

    def __init__(self, n: int) -> None:
        self.rows = np.arange(n, dtype=np.int64)

    def iter_batches(self, *, batch_size: int, batch_format: str, prefetch_batches: int) -> Iterator[dict]:
        for i in range(0, len(self.rows), batch_size):
            yield {"x": self.rows[i : i + batch_size]}


def test_resume_skips_consumed_rows_without_holding_them() -> None:
    """Skipping 200k consumed rows (1.6 MB) must hold about a chunk or a shuffle window at a time, not all of them."""
    position, chunk = 200_000, 1_000
    for window in (0, 4_000):
        shard = ViewShard(300_000)
        tracemalloc.start()
        stream = TaskStream(shard, chunk=chunk, position=position, cache_rows=0, seed=1, shuffle_window=window)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 8 * (window + chunk) * 8, (window, peak)  # 8 bytes a row; a few windows of slack
        resumed = stream.take(5)["x"].tolist()
        uninterrupted = TaskStream(ViewShard(300_000), chunk=chunk, cache_rows=0, seed=1, shuffle_window=window)
        uninterrupted.take(position)
        assert resumed == uninterrupted.take(5)["x"].tolist()


def test_small_tasks_are_read_by_the_workers_themselves() -> None:
    """Every task of at most ``limit`` rows, a lone one of its mode too: none of them gets a Ray Data stream."""
    rows = {"u2i": 5000, "q2i": 300, "i2i": 4096, "sentiment_analysis": 12, "item_profile": 40, "user_profile": 9000}
    assert small_tasks(rows, 4096) == ["q2i", "i2i", "sentiment_analysis", "item_profile"]
    assert small_tasks(rows, 300) == ["q2i", "sentiment_analysis", "item_profile"]
    assert small_tasks(rows, 12) == ["sentiment_analysis"]
    assert small_tasks(rows, 0) == []


def test_a_memory_shard_streams_and_resumes_like_a_dataset_shard() -> None:
    """A small task's rows in memory serve a TaskStream exactly as a shard does: same order, exact resume."""
    first = TaskStream(MemoryShard({"x": np.arange(10)}), chunk=4, seed=3, shuffle_window=4)
    streamed = TaskStream(ListShard(10), chunk=4, seed=3, shuffle_window=4)
    assert first.take(7)["x"].tolist() == streamed.take(7)["x"].tolist()
    resumed = TaskStream(MemoryShard({"x": np.arange(10)}), chunk=4, seed=3, shuffle_window=4, **first.state())
    assert resumed.take(9)["x"].tolist() == first.take(9)["x"].tolist() == streamed.take(9)["x"].tolist()

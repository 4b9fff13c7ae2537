"""Per-task row streams on a training worker: any number of rows per step, epochs restarting on their own.

Each task above ``small_task_rows`` is its own Ray Data dataset, split across workers by Ray Train. S2Sched
changes how many rows of each task a step takes, so a worker pulls rows on demand from a buffer instead of
fixed-size batches. Every rank takes the same counts at the same step, so the equal-sized streaming splits reach
their epoch ends together.

Task tables are written in build order (user by user, anchor by anchor): unshuffled, one anchor's rows would be
each other's in-batch negatives. Each epoch is shuffled in windows of ``shuffle_window`` rows by a permutation
drawn from (seed, epoch, window), applied to the shard's fixed row order (Ray Data preserves it). The order is
a pure function of those, so a rerun is identical and a resume that skips ``position`` rows lands exactly where
the interrupted run was, whether the epoch comes from the shard or from memory. (Ray Data's own local shuffle
buffer would shuffle only what streams from the shard, not an epoch replayed from memory.)

Small tasks (``BatchConfig.small_task_rows``, ``small_tasks``) get no Ray Data stream: each worker reads and
tokenises its rows of them itself (``batches.worker_rows``: every world-th row, in build order, so the workers
hold each row once) and serves them from a ``MemoryShard``. A Ray Data execution costs its start-up (operator
tasks in fresh worker processes, a coordinator actor) however few its rows: on 2 shared cores the Magazine slice's
12 small tasks took 108 s as two Ray Data executions (one per mode), 7 s read and tokenised in one process.

An epoch restart is a new Ray Data execution (read, tokenise, split: seconds of start-up and CPU), and a small
task (a few dozen rows) ends its epoch every few steps: on a real slice that was 30 % of the run's step time
spent waiting. So a shard whose epoch fits in ``cache_rows`` is kept (in its fixed order) from its first epoch
and replayed from memory after that.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

Rows = dict[str, np.ndarray]


class Shard(Protocol):
    """What a worker needs of a dataset shard (ray.data.DataIterator satisfies it)."""

    def iter_batches(self, *, batch_size: int, batch_format: str, prefetch_batches: int) -> Iterator[Rows]: ...


def small_tasks(rows: dict[str, int], limit: int) -> list[str]:
    """The tasks of at most ``limit`` training rows, in the given order: the workers read these themselves."""
    return [task for task, n in rows.items() if n <= limit]


class MemoryShard:
    """Rows held in memory, served in chunks like a dataset shard (``Shard``)."""

    def __init__(self, rows: Rows) -> None:
        self.rows = rows

    def iter_batches(self, *, batch_size: int, batch_format: str, prefetch_batches: int) -> Iterator[Rows]:
        for start in range(0, _length(self.rows), batch_size):
            yield {k: v[start : start + batch_size] for k, v in self.rows.items()}


def _length(rows: Rows) -> int:
    return len(next(iter(rows.values())))


def concat_rows(parts: list[Rows]) -> Rows:
    keys = parts[0].keys()
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}


class TaskStream:
    """Rows of one task's shard on demand; tracks (epoch, position) so a resumed run can skip what it consumed."""

    def __init__(
        self,
        shard: Shard,
        chunk: int = 64,
        epoch: int = 0,
        position: int = 0,
        cache_rows: int = 4096,
        seed: int = 0,
        shuffle_window: int = 0,
    ) -> None:
        self.shard, self.chunk, self.cache_rows = shard, chunk, cache_rows
        self.seed, self.shuffle_window = seed, shuffle_window
        self.epoch, self.position = epoch, 0
        self._buffer: Rows | None = None
        self._epoch_chunks: list[Rows] | None = []  # this epoch's chunks so far; None once past cache_rows
        self._epoch_rows = 0
        self._cached: list[Rows] | None = None  # a whole epoch, once one fitted
        self._batches = self._open()
        self._skip(position)

    def _open(self) -> Iterator[Rows]:
        if self._cached is not None:
            ordered = iter(self._cached)
        else:
            ordered = self._remembering(
                self.shard.iter_batches(batch_size=self.chunk, batch_format="numpy", prefetch_batches=2)
            )
        return self._shuffled(ordered) if self.shuffle_window > 1 else ordered

    def _remembering(self, chunks: Iterator[Rows]) -> Iterator[Rows]:
        for rows in chunks:
            self._remember(rows)
            yield rows

    def _shuffled(self, chunks: Iterator[Rows]) -> Iterator[Rows]:
        """Windows of ``shuffle_window`` rows in the fixed order, each permuted by (seed, epoch, window)."""
        epoch, window, pending, size = self.epoch, 0, [], 0
        for rows in chunks:
            pending.append(rows)
            size += _length(rows)
            while size >= self.shuffle_window:
                whole = concat_rows(pending)
                head = {k: v[: self.shuffle_window] for k, v in whole.items()}
                pending = [{k: v[self.shuffle_window :] for k, v in whole.items()}]
                size -= self.shuffle_window
                yield self._permute(head, epoch, window)
                window += 1
        if size:
            yield self._permute(concat_rows(pending), epoch, window)

    def _permute(self, rows: Rows, epoch: int, window: int) -> Rows:
        order = np.random.default_rng([self.seed, epoch, window]).permutation(_length(rows))
        return {k: v[order] for k, v in rows.items()}

    def _next_chunk(self) -> Rows:
        try:
            rows = next(self._batches)
        except StopIteration:
            if self._cached is None and self._epoch_chunks:
                self._cached = self._epoch_chunks
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self._open()
            try:
                rows = next(self._batches)
            except StopIteration:
                raise RuntimeError("a task's shard has no rows on this worker") from None
        return rows

    def _remember(self, rows: Rows) -> None:
        if self._cached is not None or self._epoch_chunks is None:
            return
        self._epoch_chunks.append(rows)
        self._epoch_rows += _length(rows)
        if self._epoch_rows > self.cache_rows:
            self._epoch_chunks = None  # too big to keep: later epochs stream again

    def _buffered(self) -> int:
        return 0 if self._buffer is None else _length(self._buffer)

    def _skip(self, n: int) -> None:
        """Drop the rows a resumed epoch already consumed, a chunk (or shuffle window) at a time: collecting them
        first, as ``take`` would, holds a large task's whole consumed epoch in a worker's memory at start-up."""
        while n > 0:
            n -= _length(self._pop(n))

    def prime(self) -> None:
        """Fetch the first chunk now: called for all tasks at once, their pipelines start in parallel instead of
        one after another as the first step asks each task in turn."""
        if not self._buffered():
            self._buffer = self._next_chunk()

    def _pop(self, n: int) -> Rows:
        """Up to ``n`` rows from the buffer, refilled first from the next chunk (of this epoch or the next)."""
        if not self._buffered():
            self._buffer = self._next_chunk()
        assert self._buffer is not None
        k = min(n, self._buffered())
        rows = {key: v[:k] for key, v in self._buffer.items()}
        self._buffer = {key: v[k:] for key, v in self._buffer.items()}
        self.position += k
        return rows

    def take(self, n: int) -> Rows:
        """The next ``n`` rows, crossing epoch boundaries when the shard runs out."""
        parts: list[Rows] = []
        while n > 0:
            parts.append(self._pop(n))
            n -= _length(parts[-1])
        return concat_rows(parts)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

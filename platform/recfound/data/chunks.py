"""The kept reviews in chunks of whole users, each handed to a Ray task, results taken in input order.

The kept reviews reach the driver as Arrow blocks in which each user's rows are together and users ascend (the
de-duplication group-by's output, read in order). The driver cuts them into chunks of whole users (Arrow slices, no
Python row objects) and runs one Ray task per chunk, at most two per CPU in flight; the results come back in
submission order, so what the driver does with them (writing rows, merging cross-user facts) happens in the order
one pass over the users would. Both passes over the users (``behaviour.gathered``, ``user_rows.templated``) run so,
on every core of the cluster, while the driver stays one process.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from recfound.data.memory import own_buffers

USER = "user"
CHUNK_ROWS = 4096
"""Reviews per task (whole users, so a chunk may hold more): big enough that a task's start-up and its result's
transfer are small beside its work (templating takes ~0.2 ms of Python per review), small enough that a result
(~6 task rows per review, ~25 MB) is small beside the object store and a worker's Python rows of one chunk stay
small beside the worker (with 8192, the 4M-review synthetic build's templating workers held ~340 MiB PSS each
instead of ~300, its templating pass ~60 MiB more in all; rows and their order do not depend on it)."""
MAX_IN_FLIGHT = 64
"""Most chunks submitted and not yet taken: the driver takes results one at a time, in order, so on a large cluster
more would only pile finished results (~25 MB of rows each) up in the object store."""


def user_chunks(blocks: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The blocks' rows cut into tables of whole users, each of at least ``rows`` rows but the last, in order. A
    user's rows may span blocks: the rows of the last user seen wait for the next block."""
    pending: pa.Table | None = None
    for block in blocks:
        if not block.num_rows:
            continue
        if pending is not None:
            last, following = pending[USER][pending.num_rows - 1].as_py(), block[USER][0].as_py()
            if following < last:
                raise RuntimeError(f"reviews reached the driver out of user order: {following!r} after {last!r}")
        pending = block if pending is None else pa.concat_tables([pending, block])
        while pending.num_rows > rows:
            end = _users_end(pending[USER], rows)
            if end == pending.num_rows:
                break  # the user at the cut may go on in the next block
            yield pending.slice(0, end)
            pending = pending.slice(end)
    if pending is not None:
        yield pending


def _users_end(users: pa.ChunkedArray, rows: int) -> int:
    """Where the user holding row ``rows - 1`` ends: users ascend, so that is how many rows sort at or below it."""
    return pc.sum(pc.less_equal(users, users[rows - 1])).as_py()


def in_order(task: Any, blocks: Iterable[pa.Table], *args: Any) -> Iterator[Any]:
    """``task.remote(chunk, *args)`` for each chunk of whole users (``CHUNK_ROWS``), results in input order, two
    tasks per CPU in flight, at most ``MAX_IN_FLIGHT``."""
    window = min(MAX_IN_FLIGHT, 2 * max(1, int(ray.cluster_resources().get("CPU", 1))))
    running: deque[ray.ObjectRef] = deque()
    for chunk in user_chunks(blocks, CHUNK_ROWS):
        running.append(task.remote(own_buffers(chunk), *args))  # a slice would send its whole block
        if len(running) >= window:
            yield ray.get(running.popleft())
    while running:
        yield ray.get(running.popleft())


class Shared:
    """A value for every task of a pass: put in the object store once and unpickled once per worker process (Ray
    resolves an object reference given as a task's argument for every task, not one held inside an argument)."""

    _cache: dict[str, Any] = {}
    """The value a worker process last unpickled, by object id: one pass's tasks share it."""

    def __init__(self, value: Any):
        self._refs = [ray.put(value)]

    def get(self) -> Any:
        key = self._refs[0].hex()
        if key not in Shared._cache:
            Shared._cache.clear()
            Shared._cache[key] = ray.get(self._refs[0])
        return Shared._cache[key]

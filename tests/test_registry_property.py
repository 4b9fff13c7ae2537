"""Registry property: whatever file write of a publish fails, ``latest`` resolves to a version that verifies.

A state machine publishes into a local and a memory:// registry: some publishes get a write error (ENOSPC) at
their k-th file write, half the bytes written first, anywhere: the claim, staging, the upload, the pointer; some
publishers die there (SIGKILL: no cleanup runs); some publish at the same time as others.
"""

from __future__ import annotations

import builtins
import errno
import io
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.memory import MemoryFileSystem
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from test_serve_engine import make_artifact, make_dataset, publish_fake

from recfound.serving.registry import (
    STAGE_PREFIX,
    STALE_STAGE_S,
    VERSIONS,
    latest_version,
    list_versions,
    resolve_verified,
    verify,
    version_number,
)


def _full_disk() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _Torn:
    """A file whose first write puts half its bytes down, then meets ``fault``: a full disk raises, a SIGKILL
    never returns."""

    def __init__(self, handle: Any, fault: Callable[[], None]):
        self._handle, self._fault = handle, fault

    def write(self, data: Any) -> int:
        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        self._fault()
        raise AssertionError("the fault returned")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> _Torn:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()  # memory:// commits on close: a torn object lands, as on a store without atomic PUT


@contextmanager
def _fault_at(k: int, fault: Callable[[], None] = _full_disk) -> Iterator[list[int]]:
    """The ``k``-th file opened for writing (locally or on memory://) is torn by ``fault``; yields [files opened
    so far]."""
    opened = [0]
    real_open, real_memory_open = builtins.open, MemoryFileSystem._open

    def counting(opener: Callable[..., Any], mode_at: int) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            handle = opener(*args, **kwargs)
            mode = kwargs.get("mode", args[mode_at] if len(args) > mode_at else "r")
            if set(mode) & set("wax"):
                opened[0] += 1
                return _Torn(handle, fault) if opened[0] == k else handle
            return handle

        return wrapped

    builtins.open = io.open = counting(real_open, 1)
    MemoryFileSystem._open = counting(real_memory_open, 2)  # type: ignore[method-assign]
    try:
        yield opened
    finally:
        builtins.open = io.open = real_open
        MemoryFileSystem._open = real_memory_open  # type: ignore[method-assign]


class Publishing(RuleBasedStateMachine):
    memory = False

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="registry-property-"))
        self.model, self.data = make_artifact(self.tmp / "model"), make_dataset(self.tmp / "data")
        self.name = f"prop-{uuid.uuid4().hex[:8]}"
        self.url = f"memory://{self.name}" if self.memory else str(self.tmp / "registry")
        self.newest_ok = 0
        self.killed = 0  # publishers killed since stale stages were last collected
        self.frozen = threading.Event()  # released at teardown: memory:// publishers "killed" mid-write wait here

    @rule()
    def publish(self) -> None:
        self.newest_ok = version_number(self._publish())

    @rule(k=st.integers(1, 14))
    def publish_with_a_full_disk(self, k: int) -> None:
        try:
            with _fault_at(k) as opened:
                name = self._publish()
        except OSError as err:
            assert opened[0] >= k, f"failed without the injected error: {err!r}"
            return
        self.newest_ok = version_number(name)

    @rule(k=st.integers(1, 14))
    def publisher_killed_mid_write(self, k: int) -> None:
        """SIGKILL at the k-th file write: no ``except`` or ``finally`` of the publisher runs. A local publisher is a
        forked process that kills itself; memory:// lives in this process, so there the publisher is a thread that
        stops for good at that write (the store is left exactly as by a kill)."""
        if self.memory:
            stopped = threading.Event()

            def stop_here() -> None:
                stopped.set()
                self.frozen.wait()

            with _fault_at(k, stop_here):
                thread = threading.Thread(target=self._publish_quietly, daemon=True)
                thread.start()
                while not stopped.is_set() and thread.is_alive():
                    time.sleep(0.01)
            killed = stopped.is_set()
        else:
            child = multiprocessing.get_context("fork").Process(target=self._publish_killed_at, args=(k,))
            child.start()
            child.join()
            killed = child.exitcode == -signal.SIGKILL
            assert killed or child.exitcode == 0, f"publisher exited with {child.exitcode}"
        if killed:
            self.killed += 1
        else:
            self.newest_ok = version_number(latest_version(self.url))  # its k-th file got no write call: it published

    @rule(n=st.integers(2, 3))
    def publish_concurrently(self, n: int) -> None:
        names: list[str] = []
        threads = [threading.Thread(target=lambda: names.append(self._publish())) for _ in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(names) == n and len(set(names)) == n, names
        self.newest_ok = max(map(version_number, names))

    @precondition(lambda self: self.killed and not self.memory)
    @rule()
    def stale_stages_are_collected(self) -> None:
        """A killed publisher's stage folder is removed by the next publish once it is older than STALE_STAGE_S."""
        old = time.time() - 2 * STALE_STAGE_S
        for stage in self._stages():
            os.utime(stage, (old, old))
        self.publish()
        assert not self._stages()
        self.killed = 0

    @invariant()
    def latest_resolves_to_a_version_that_verifies(self) -> None:
        if not self.newest_ok:
            return
        assert version_number(latest_version(self.url)) >= self.newest_ok
        verify(resolve_verified(self.url, cache_dir=str(self.tmp / "cache")))

    @invariant()
    def every_listed_version_verifies_and_only_killed_publishers_leave_stages(self) -> None:
        for name in list_versions(self.url):
            verify(resolve_verified(self.url, name, cache_dir=str(self.tmp / "cache")))
        assert len(self._stages()) <= self.killed

    def _stages(self) -> list[Path]:
        return list((self.tmp / "registry" / VERSIONS).glob(f"{STAGE_PREFIX}*")) if not self.memory else []

    def _publish(self) -> str:
        return publish_fake(self.model, self.data, self.url)

    def _publish_killed_at(self, k: int) -> None:
        with _fault_at(k, _sigkill):
            self._publish()

    def _publish_quietly(self) -> None:
        try:
            self._publish()
        except BaseException:  # released at teardown, after its registry is gone
            pass

    def teardown(self) -> None:
        self.frozen.set()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.memory and fsspec.filesystem("memory").exists(f"/{self.name}"):
            fsspec.filesystem("memory").rm(f"/{self.name}", recursive=True)


class PublishingToMemory(Publishing):
    memory = True


_FAST = settings(
    max_examples=12, stateful_step_count=6, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
TestPublishingLocally = Publishing.TestCase
TestPublishingLocally.settings = _FAST
TestPublishingToMemory = PublishingToMemory.TestCase
TestPublishingToMemory.settings = _FAST

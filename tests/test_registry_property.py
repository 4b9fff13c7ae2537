"""Registry property: whatever file write of a publish fails, ``latest`` resolves to a version that verifies.

A state machine publishes into a local and a memory:// registry; some publishes get a write error (ENOSPC) at
their k-th file write, half the bytes written first, anywhere: the claim, staging, the upload, the pointer.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.memory import MemoryFileSystem
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from test_serve_engine import make_artifact, make_dataset, publish_fake

from recfound.serving.registry import (
    STAGE_PREFIX,
    VERSIONS,
    latest_version,
    list_versions,
    resolve_verified,
    verify,
    version_number,
)


class _Torn:
    """A file whose first write puts half its bytes down, then fails as a full disk does."""

    def __init__(self, handle: Any):
        self._handle = handle

    def write(self, data: Any) -> int:
        self._handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> _Torn:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()  # memory:// commits on close: a torn object lands, as on a store without atomic PUT


@contextmanager
def _full_disk_at(k: int) -> Iterator[list[int]]:
    """The ``k``-th file opened for writing (locally or on memory://) is torn; yields [files opened so far]."""
    opened = [0]
    real_open, real_memory_open = builtins.open, MemoryFileSystem._open

    def counting(opener: Callable[..., Any], mode_at: int) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            handle = opener(*args, **kwargs)
            mode = kwargs.get("mode", args[mode_at] if len(args) > mode_at else "r")
            if set(mode) & set("wax"):
                opened[0] += 1
                return _Torn(handle) if opened[0] == k else handle
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

    @rule()
    def publish(self) -> None:
        self.newest_ok = version_number(publish_fake(self.model, self.data, self.url))

    @rule(k=st.integers(1, 14))
    def publish_with_a_full_disk(self, k: int) -> None:
        try:
            with _full_disk_at(k) as opened:
                name = publish_fake(self.model, self.data, self.url)
        except OSError as err:
            assert opened[0] >= k, f"failed without the injected error: {err!r}"
            return
        self.newest_ok = version_number(name)

    @invariant()
    def latest_resolves_to_a_version_that_verifies(self) -> None:
        if not self.newest_ok:
            return
        assert version_number(latest_version(self.url)) >= self.newest_ok
        verify(resolve_verified(self.url, cache_dir=str(self.tmp / "cache")))

    @invariant()
    def every_listed_version_verifies_and_no_stage_is_left(self) -> None:
        for name in list_versions(self.url):
            verify(resolve_verified(self.url, name, cache_dir=str(self.tmp / "cache")))
        if not self.memory and (self.tmp / "registry" / VERSIONS).is_dir():
            assert not list((self.tmp / "registry" / VERSIONS).glob(f"{STAGE_PREFIX}*"))

    def teardown(self) -> None:
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

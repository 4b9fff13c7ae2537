"""Suite-wide setup: offline, quiet, and one small synthetic dataset shared by the tests that need one."""

import asyncio
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic shop built once per session (every buildable task, a few hundred rows each)."""
    from recfound.data.builder import BuildConfig, build
    from recfound.data.synthetic import SyntheticConfig

    out = tmp_path_factory.mktemp("synthetic")
    build(BuildConfig(out=str(out), synthetic=SyntheticConfig(users=120, items=60, queries=40)))
    return out


@pytest.fixture(scope="module")
def shared_ray() -> Iterator[None]:
    """One local Ray for every build in a module: a build outside a running Ray starts and stops its own, seconds
    each on 2 cores. Per module, not per session: other modules start Ray with their own resources (num_cpus, a
    worker setup hook) and stop it, and an instance left running would make their ``ray.init`` fail. A Ray already
    running is borrowed and left running."""
    from recfound.data.reading import local_ray

    with local_ray():
        yield


@pytest.fixture
def one_thread():
    """Tiny-model tests run several times faster on the 2 shared CI cores without intra-op threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def replica_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """For a Serve replica class run in process: ``@serve.batch`` reads the replica's ``max_ongoing_requests``
    (only to warn when batches could never fill); outside Serve it gets the deployment's."""
    from ray import serve

    from recfound.serving.model import Model

    config = SimpleNamespace(max_ongoing_requests=Model.max_ongoing_requests)
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(_deployment_config=config))


@pytest.fixture(scope="session")
def loop() -> Iterator[asyncio.Runner]:
    """One event loop for every in-process replica of the run, as a replica has one: a ``@serve.batch`` queue
    belongs to the method, not the instance, and is bound to the loop of its first call (a loop per module left
    the next module's batches waiting on a closed loop)."""
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture(scope="module")
def benchmark() -> ModuleType:
    """jobs/benchmark.py as a module (a script, not a package module), for the benchmark tests to call ``main``."""
    spec = importlib.util.spec_from_file_location(
        "benchmark_job", Path(__file__).resolve().parents[1] / "jobs" / "benchmark.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

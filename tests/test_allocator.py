"""Training workers run on Ray's jemalloc (recfound/allocator.py): glibc's malloc fragmented under a CPU step's
changing shapes and slowed the quality recipe's steps by half within 100 steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from recfound.allocator import allocator_env_vars, ray_jemalloc


def test_the_workers_preload_rays_jemalloc_unless_the_user_set_ld_preload(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = ray_jemalloc()
    assert lib is not None and lib.name == "libjemalloc.so" and lib.is_file()  # Ray's Linux wheel ships it
    assert allocator_env_vars({}) == {"LD_PRELOAD": str(lib)}
    assert allocator_env_vars({"LD_PRELOAD": ""}) == {}  # empty: the user keeps glibc's malloc
    assert allocator_env_vars({"LD_PRELOAD": "/opt/tcmalloc.so"}) == {}
    monkeypatch.setattr("recfound.allocator.ray_jemalloc", lambda: None)
    assert allocator_env_vars({}) == {}


@ray.remote
def _mapped_libraries() -> set[str]:
    return {Path(line.split()[-1]).name for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line}


def test_a_worker_started_with_the_variables_runs_on_jemalloc(shared_ray: None) -> None:
    """Ray sets runtime_env variables before it starts the worker process, so the preload takes effect there."""
    preloaded = _mapped_libraries.options(runtime_env={"env_vars": allocator_env_vars({})}).remote()
    plain = _mapped_libraries.options(runtime_env={"env_vars": {"LD_PRELOAD": ""}}).remote()
    assert "libjemalloc.so" in ray.get(preloaded)
    assert "libjemalloc.so" not in ray.get(plain)

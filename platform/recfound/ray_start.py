"""Starting Ray the one way every recfound job does (training, dataset builds): joined through ``RAY_ADDRESS`` (a
cluster, ``ray job submit``) the library is shipped to every worker, installed there or not; otherwise a local
instance starts with the CPUs the job asks for. The driver's own Ray notices go to Ray's log files.

Ray is imported when a job starts it, not with this module: train/console.py's settings must reach the environment
before Ray reads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import recfound

RAY_CONSOLE_LEVEL = "ERROR"
"""Ray's console level for the libraries with a documented one: warnings go to the log files only."""


def start_ray(
    *,
    env_vars: dict[str, str] | None = None,
    local_env_vars: dict[str, str] | None = None,
    num_cpus: int | None = None,
    dashboard: bool | None = None,
    object_store_memory: int | None = None,
    reap_idle_workers: bool = False,
    echo: bool,
) -> Any:
    """``ray.init`` for a job; returns its context. ``local_env_vars`` (added to ``env_vars``), ``num_cpus``,
    ``dashboard``, ``object_store_memory`` (bytes) and ``reap_idle_workers`` apply to a local instance only (a
    cluster has its own); ``reap_idle_workers``: a worker idle for a second exits, where Ray keeps one per CPU for
    reuse holding whatever memory its last tasks left (a job of distinct stages, a build, gives it back between
    them; a training run's streams keep reusing theirs);
    ``echo``: whether the workers' output is echoed to the driver (a build prints its own table; a training run
    shows its workers' progress lines)."""
    import ray

    runtime_env: dict[str, Any] = {"env_vars": env_vars} if env_vars else {}
    if os.environ.get("RAY_ADDRESS"):
        runtime_env["py_modules"] = [str(Path(recfound.__file__).parent)]
        return ray.init(runtime_env=runtime_env, log_to_driver=echo, logging_level=RAY_CONSOLE_LEVEL)
    if local_env_vars:
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **local_env_vars}
    return ray.init(
        num_cpus=num_cpus,
        runtime_env=runtime_env,
        include_dashboard=dashboard,
        object_store_memory=object_store_memory,
        log_to_driver=echo,
        logging_level=RAY_CONSOLE_LEVEL,
        _system_config={"num_workers_soft_limit": 0} if reap_idle_workers else None,
    )

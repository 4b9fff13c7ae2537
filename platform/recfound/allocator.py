"""The memory allocator of a training job's Ray workers: jemalloc, the build Ray ships in its wheel, instead of
glibc's malloc.

Why: a CPU training step allocates and frees tensors of ever-changing shapes (batches padded to their longest row,
S2Sched's task mix changing every step). glibc's malloc fragments under that churn and its free-list searches grow
with it: `configs/quality.yaml` on 2 Intel Xeon cores with AMX (Magazine slice, seed 0) slowed from 9.6 s a step
to 13.5 s by step 130, with ``_int_malloc`` about 30 % of the worker's CPU samples (``py-spy --native``) and the
worker's peak memory at 9.1 GiB; with jemalloc preloaded the same steps stayed at 8.3-8.6 s and the peak at
6.0 GiB (README "How training works"). PyTorch's CPU performance tuning guide recommends jemalloc or tcmalloc for
the same reason. Ray ships ``libjemalloc.so`` (``ray/core``), so nothing is installed for it. Only training gets
it: a dataset build's workers and an evaluation's process measured no better with it (README).

The variable goes to the workers' environment (``runtime_env["env_vars"]``), which Ray sets before it starts each
worker process, where a preload takes effect. A user who sets ``LD_PRELOAD`` (empty keeps glibc's malloc) wins.
This module imports nothing from Ray.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path


def ray_jemalloc() -> Path | None:
    """Ray's own jemalloc build, where the installed Ray ships one (its Linux wheels do)."""
    spec = importlib.util.find_spec("ray")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(folder) / "core" / "libjemalloc.so"
        if lib.is_file():
            return lib
    return None


def allocator_env_vars(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``{"LD_PRELOAD": <Ray's jemalloc>}`` for the job's workers on Linux; empty where the user set ``LD_PRELOAD``
    or Ray ships no jemalloc."""
    lib = ray_jemalloc() if sys.platform.startswith("linux") and "LD_PRELOAD" not in environ else None
    return {"LD_PRELOAD": str(lib)} if lib else {}

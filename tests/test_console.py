"""The training job's quiet console: the driver skips Ray's known informational lines (they stay in the session's
log files), never our progress lines, a warning of ours, or an error."""

from __future__ import annotations

import re

import pytest

from recfound.train.console import quiet_ray_console, worker_env_vars

# As Ray 2.60 echoed them to the terminal in `make demo` (the raylet one from its format string), minus the
# "(RayTrainWorker pid=...)" prefix the driver adds after filtering.
RAY_LINES = [
    "Starting execution of Dataset small-generative-tasks_0358ezmXs5LvZVg4miHoKf_0. Full logs are in "
    "/tmp/ray/session_2026-12-04_04-50-32_386616_23607/logs/ray-data",
    "Execution plan of Dataset small-generative-tasks_0358ezmXs5LvZVg4miHoKf_0: InputDataBuffer[Input] -> "
    "TaskPoolMapOperator[ListFiles] -> TaskPoolMapOperator[ReadFilesParquetV2]",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "✔️  Dataset small-embedding-tasks_0358f1ITn3iqebChS5bAFm_0 execution finished in 30.33 seconds",
    "Cluster resources are not enough to run any task from TaskPoolMapOperator[MapBatches(tokenize)]. The job may "
    "hang forever unless the cluster scales up.",
    "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'step': 5, 'loss': 6.003822247943455}, "
    "validation=False) from rank 1",
    "[2026-12-04 04:50:51,339 E 24197 24235] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and "
    "ID: 'a4da2959d916d6f0e074ad3c01000000' has constructor arguments in the object store and max_restarts > 0. "
    "If the arguments are spilled to external storage, they may be lost on restart.",
    "WARNING: 12 PYTHON worker processes have been started on node: 5f3a with address: 192.0.2.2, which is 6x the "
    "maximum expected startup concurrency (2). This could be a result of using a large number of actors.",
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. Continuing to "
    "monitor.",
]
OUR_LINES = [
    "step 5/60 | loss 6.004 | eta 0:57 | lr 9.48e-04 | 522 ms | 42,213 tok/s | 91.9 samples/s | flop_share 32.9% | "
    "peak mem 1,278 MB | data wait 0.1% | i2i=4.129 u2i=2.876",
    "step 7: gradient norm not finite; update skipped (1 in a row)",
    "Traceback (most recent call last):",
    '  File "/work/main/platform/recfound/train/loop.py", line 130, in train_worker',
    "RuntimeError: checkpoint /runs/x holds ZeRO partitions of 2 workers; resume it with num_workers=2 (now 4)",
    "⚠️  Dataset u2i_0358 execution failed",
    "ray.exceptions.RayTaskError(ValueError): ray::MapBatches(tokenize)() (pid=41, ip=192.0.2.2)",
]


def _skip() -> re.Pattern[str]:
    env: dict[str, str] = {}
    quiet_ray_console(env)
    return re.compile(env["RAY_DEDUP_LOGS_SKIP_REGEX"])  # Ray compiles it so and calls .search on each line


@pytest.mark.parametrize("line", RAY_LINES, ids=lambda line: line[:40])
def test_rays_informational_lines_are_not_echoed(line: str) -> None:
    assert _skip().search(line)


@pytest.mark.parametrize("line", OUR_LINES, ids=lambda line: line[:40])
def test_progress_warnings_and_errors_are_echoed(line: str) -> None:
    assert not _skip().search(line)


def test_the_users_own_settings_win() -> None:
    """An exported RAY_DEDUP_LOGS_SKIP_REGEX is kept, and a job's own PYTHONWARNINGS is left alone (setting it
    again in the workers' runtime_env would also conflict with a submitted job's)."""
    env = {"RAY_DEDUP_LOGS_SKIP_REGEX": "mine"}
    quiet_ray_console(env)
    assert env == {"RAY_DEDUP_LOGS_SKIP_REGEX": "mine"}
    assert worker_env_vars({"PYTHONWARNINGS": "error"}) == {}
    assert worker_env_vars({}) == {"PYTHONWARNINGS": "ignore::DeprecationWarning"}

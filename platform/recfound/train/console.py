"""What a training job shows in its terminal: our progress lines and every error, not Ray's internal chatter.

Ray echoes each worker's and actor's output to the driver; every line also stays in the session's log files
(``/tmp/ray/session_latest/logs``: worker-*.out/.err, raylet.out, train/, ray-data/). These settings only decide
what the driver echoes, using Ray's documented switches:

- Ray Train: ``RunConfig(logging_config=LoggingConfig(log_level=...))`` filters ``ray.train``'s console output;
  its ``ray-train-sys-*`` files keep every level.
- the driver's own ``ray`` logger: ``ray.init(logging_level=...)``.
- Ray's deprecation warnings about its own internals: ``PYTHONWARNINGS=ignore::DeprecationWarning`` on the
  workers (the switch Ray's warning names), which is Python's default for every other module.
- the rest (Ray Data's per-dataset execution lines, raylet and core-worker notices, helper actors):
  ``RAY_DEDUP_LOGS_SKIP_REGEX``, lines the driver does not echo. Only these known messages are matched, so a
  traceback or an error line always gets through; ``RAY_DEDUP_LOGS=0`` turns the filter off (shows everything).

This module imports nothing from Ray: ``quiet_ray_console`` must run before Ray is imported, which reads its
environment once.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# Ray 2.60's informational lines that arrive at the driver as worker output, by their source.
RAY_NOISE = (
    r"Starting execution of Dataset ",  # Ray Data, per dataset and worker
    r"Execution plan of Dataset ",
    r"Dataset \S+ execution finished in ",
    r"Progress bars (for operators )?disabled",
    r"Cluster resources are not enough to run any task from ",  # while other datasets' tasks hold the spare CPU
    r"Reporting training result \d+: TrainingReport\(",  # Ray Train logs it outside ``ray.train`` (getLogger(__file__))
    r"worker processes have been started on node",  # raylet: more worker starts than CPUs (start-up, not a fault)
    r"has constructor arguments in the object store and max_restarts > 0",  # core worker, Ray Train's helper actors
    r"Failed to query Ray Train Controller actor state",  # Ray Train's placement-group cleaner, it retries
)


def quiet_ray_console(environ: MutableMapping[str, str] = os.environ) -> None:
    """Let the driver skip Ray's known informational lines; a user's own setting of the variable wins."""
    environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "|".join(f"(?:{pattern})" for pattern in RAY_NOISE))


def worker_env_vars(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Environment for the job's Ray workers (``runtime_env["env_vars"]``); empty where the user set it, so a
    submitted job's own ``PYTHONWARNINGS`` is neither overridden nor a runtime-env conflict."""
    return {} if "PYTHONWARNINGS" in environ else {"PYTHONWARNINGS": "ignore::DeprecationWarning"}

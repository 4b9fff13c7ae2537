"""`python jobs/train.py` as a user runs it on a local Ray: a quiet terminal (rank 0's progress lines, our own
messages, the checkpoint path) while Ray's informational lines still reach the session's log files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from recfound.train.console import RAY_NOISE

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Ray's chatter the console hides by other switches than the skip list: Ray Train's own logger, the driver's
# `ray` logger, Ray's deprecation warnings.
HIDDEN = [
    *RAY_NOISE,
    r"Setting up process group",
    r"Requesting resources",
    r"Started training worker group",
    r"Token authentication is enabled",
    r"Started a local Ray instance",
    r"RayDeprecationWarning",
]


def test_the_training_job_shows_its_progress_and_not_rays_chatter(synthetic_dataset: Path, tmp_path: Path) -> None:
    # The suite turns Ray's log filter off (conftest: RAY_DEDUP_LOGS=0); a user's shell has it on.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_DEDUP_LOGS", "RAY_ADDRESS")}
    args = [
        f"data={synthetic_dataset}",
        f"storage_path={tmp_path}",
        "name=quiet",
        "max_steps=2",
        "log_every=1",
        "checkpoint_every=2",
        "tasks=[u2i,sentiment_analysis]",
        "scheduler.warmup=2",
    ]
    done = subprocess.run(
        [sys.executable, "jobs/train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    shown = done.stdout + done.stderr
    assert done.returncode == 0, shown[-6000:]
    assert Path(done.stdout.strip().splitlines()[-1], "trainer_state.json").is_file()
    assert re.search(r"step 1/2 \| loss \d+\.\d{3} \| eta \d+:\d\d \| .*u2i=\d", shown), shown
    assert re.search(r"step 2/2 \| loss \d+\.\d{3} \| eta 0:00 \| ", shown), shown
    assert shown.count("step 2/2 |") == 1, shown  # one copy: through the worker's logger, not print's tee
    noisy = [line for line in shown.splitlines() if any(re.search(p, line) for p in HIDDEN)]
    assert not noisy, "\n".join(noisy)

    logs = Path(re.search(r"^ray: logs in ([^,\s]+)", done.stdout, re.MULTILINE).group(1))
    kept = "".join(p.read_text(errors="replace") for p in [*logs.glob("worker-*.err"), *logs.glob("train/*.log")])
    assert "Reporting training result" in kept and "Setting up process group" in kept

"""The test clusters' job runner (tests/cluster_dashboard.py `run_job`) submits a job once more when, and only when,
it was lost to the fake autoscaler's shared session directory (FAKE_NODE_PACKAGE_RACE), a Ray test-harness race seen
once in CI. A dashboard whose jobs end as scripted stands in for Ray.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cluster_dashboard import FAKE_NODE_PACKAGE_RACE, ClusterDashboard

RACE_LOG = f"ValueError: Local directory /tmp/rfhead/session/runtime_resources/_ray_pkg_1 {FAKE_NODE_PACKAGE_RACE}"


class ScriptedDashboard(ClusterDashboard):
    """Each submitted job ends at once with the next (status, log) of `endings`."""

    def __init__(self, endings: list[tuple[str, str]]) -> None:
        self.endings = endings
        self.jobs: dict[str, tuple[str, str]] = {}
        self.submitted: list[tuple[str, list[str]]] = []
        self.notes: list[str] = []

    def submit(self, submission_id: str, working_dir: Path, entrypoint: list[str], timeout: float = 60) -> None:
        self.submitted.append((submission_id, entrypoint))
        self.jobs[submission_id] = self.endings.pop(0)

    def job(self, submission_id: str) -> dict:
        return {"submission_id": submission_id, "status": self.jobs[submission_id][0]}

    def job_logs(self, submission_id: str) -> str:
        return self.jobs[submission_id][1]

    def note(self, message: str) -> None:
        self.notes.append(message)


def _run(endings: list[tuple[str, str]]) -> tuple[ScriptedDashboard, dict, str]:
    dashboard = ScriptedDashboard(endings)
    info, logs = dashboard.run_job("job", Path("."), lambda name: ["train", f"name={name}"], timeout=5)
    return dashboard, info, logs


def test_a_job_lost_to_the_fake_nodes_race_is_submitted_once_more_under_a_new_name():
    dashboard, info, logs = _run([("FAILED", RACE_LOG), ("SUCCEEDED", "done")])
    assert dashboard.submitted == [("job", ["train", "name=job"]), ("job-retry", ["train", "name=job-retry"])]
    assert (info["submission_id"], info["status"], logs) == ("job-retry", "SUCCEEDED", "done")
    assert any("shared session dir" in n for n in dashboard.notes)


@pytest.mark.parametrize(
    "endings",
    [
        [("SUCCEEDED", RACE_LOG)],  # the message in a log of a job that ended well
        [("FAILED", "ValueError: bad config")],  # any other failure
        [("FAILED", RACE_LOG), ("FAILED", RACE_LOG)],  # the race twice: the second is the test's to judge
    ],
    ids=["succeeded", "another failure", "lost twice"],
)
def test_any_other_ending_is_returned_as_it_is(endings):
    last = endings[-1]
    dashboard, info, logs = _run(list(endings))
    assert len(dashboard.submitted) == len(endings)
    assert (info["status"], logs) == last

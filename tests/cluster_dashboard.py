"""The dashboard of a test cluster, for tests/cluster_utils.py's LocalCluster: its REST API (the state API, the
job API) and the jobs submitted through it.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

from cluster_processes import RAY, wait_for

# Ray's fake autoscaler starts its nodes without a temp dir of their own (RayParams in
# ray/autoscaler/_private/fake_multi_node/node_provider.py), so every fake node unpacks a job's working_dir and
# py_modules into the head's one session directory, and one node's agent can find the package gone under another's
# unpacking: the job fails with this (a RuntimeEnvSetupError, which Ray Train does not retry). Seen once in CI.
FAKE_NODE_PACKAGE_RACE = "does not exist on the cluster. Something may have gone wrong while downloading or unpacking"


class ClusterDashboard:
    """LocalCluster's dashboard methods (it is LocalCluster's base class, a module of its own to keep
    cluster_utils.py short). They use the cluster's ``dashboard_url``, ``token``, ``nodes``, ``env``, ``note`` and
    ``import_log``."""

    # -- the dashboard's REST API (state, jobs) -------------------------------------------------------------------
    def _get(self, path: str, timeout: float = 10) -> Any:
        request = urllib.request.Request(self.dashboard_url + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def _dashboard_up(self) -> bool:
        self.nodes["head"].check_running()
        try:
            self._get("/api/version", timeout=2)
            return True
        except OSError:
            return False

    def _state(self, resource: str, filters: list[tuple[str, str, str]] = (), detail: bool = False) -> list[dict]:
        query = [("limit", "1000"), ("detail", str(detail).lower())]
        for key, predicate, value in filters:
            query += [("filter_keys", key), ("filter_predicates", predicate), ("filter_values", value)]
        body = self._get(f"/api/v0/{resource}?{urllib.parse.urlencode(query)}")
        return body["data"]["result"]["result"]

    def nodes_state(self) -> list[dict]:
        try:
            return self._state("nodes", detail=True)
        except OSError:
            return []

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.nodes_state() if n["state"] == "ALIVE"]

    def actors(self, class_name: str) -> list[dict]:
        return self._state("actors", [("class_name", "=", class_name)], detail=True)

    # -- jobs ---------------------------------------------------------------------------------------------------
    def submit(self, submission_id: str, working_dir: Path, entrypoint: list[str], timeout: float = 60) -> None:
        cmd = [
            RAY,
            "job",
            "submit",
            f"--address={self.dashboard_url}",
            f"--submission-id={submission_id}",
            f"--working-dir={working_dir}",
            "--no-wait",
            "--",
            *entrypoint,
        ]
        done = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"ray job submit failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        self.note(f"job {submission_id} submitted")

    def job(self, submission_id: str) -> dict:
        return self._get(f"/api/jobs/{submission_id}")

    def job_logs(self, submission_id: str) -> str:
        return self._get(f"/api/jobs/{submission_id}/logs")["logs"]

    def wait_job(self, submission_id: str, timeout: float) -> dict:
        def finished() -> dict | None:
            info = self.job(submission_id)
            return info if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED") else None

        try:
            info = wait_for(f"job {submission_id}", finished, timeout, interval=2)
            self.note(f"job {submission_id} {info['status']}")
            return info
        except TimeoutError as err:
            raise TimeoutError(f"{err}\n--- job log tail ---\n{self.job_logs(submission_id)[-6000:]}") from None

    def run_job(
        self, name: str, working_dir: Path, entrypoint: Callable[[str], list[str]], timeout: float
    ) -> tuple[dict, str]:
        """Submit job `name` (the entrypoint is built for the submission id) and wait for it: (job info, log). A job
        lost to FAKE_NODE_PACKAGE_RACE is submitted once more as `name`-retry, with a note; any other ending is
        returned as it is, for the test to judge."""
        info, logs = self._submit_and_wait(name, working_dir, entrypoint, timeout)
        if info["status"] == "FAILED" and FAKE_NODE_PACKAGE_RACE in logs:
            self.note(f"job {name} lost to the fake nodes' shared session dir; submitting it again")
            info, logs = self._submit_and_wait(f"{name}-retry", working_dir, entrypoint, timeout)
        return info, logs

    def _submit_and_wait(
        self, submission_id: str, working_dir: Path, entrypoint: Callable[[str], list[str]], timeout: float
    ) -> tuple[dict, str]:
        self.submit(submission_id, working_dir, entrypoint(submission_id))
        info = self.wait_job(submission_id, timeout)
        return info, self.job_logs(submission_id)

    def imports(self) -> list[dict]:
        if not self.import_log.exists():
            return []
        return [json.loads(line) for line in self.import_log.read_text().splitlines() if line]

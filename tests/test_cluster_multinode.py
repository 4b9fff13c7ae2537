"""Cluster acceptance: the training job on a real multi-node Ray cluster, a lost node, and autoscaling.

The tests start Ray clusters on this machine with `ray start` subprocesses (tests/cluster_utils.py: own temp dirs,
fresh ports, token auth; at teardown every process of every node is SIGKILLed by PID, never a global `ray stop`)
and drive them the way docs/cluster.md does: `ray job submit --working-dir <a copy of jobs/,
platform/ and configs/> -- python jobs/train.py ...`. The cluster's processes cannot import the editable install
of recfound (a sitecustomize drops its path entry), so the job only works if the package travels with it: the
driver from the working dir, the Train workers from the runtime_env py_modules that recfound/ray_start.py adds.

Layout: the head has 3 logical CPUs and the other node 2, and each Train worker asks for 2 (`cpus_per_worker=2`),
so no node fits both workers: one lands on each node, and the head keeps 1 CPU for Ray Data's tokenisation tasks.
The first two tests share one cluster (head + `second`); the second test kills `second` and adds `third`.
Each test prints a timeline (`pytest -s`, or on failure) and leaves the job logs in its cluster directory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from cluster_utils import REPO, copy_project, local_cluster, wait_for

from recfound.train.checkpoint import verify

pytestmark = pytest.mark.slow

TINY = ["tasks=[u2i,sentiment_analysis]", "num_workers=2", "cpus_per_worker=2", "log_every=1", "scheduler.warmup=2"]
STEP_LINE = re.compile(r"\bstep (\d+)/\d+ \|.*$", re.MULTILINE)
TASK_LOSS = {task: re.compile(rf"\| .*\b{task}=\d+\.\d+") for task in ("u2i", "sentiment_analysis")}


def _entrypoint(data: Path, storage: Path, name: str, *overrides: str) -> list[str]:
    args = [f"data={data}", f"storage_path={storage}", f"name={name}", *TINY, *overrides]
    return ["python", "jobs/train.py", *args]  # `ray job submit` shell-quotes each one (shlex.join)


def _finished(cluster, submission_id: str, timeout: float) -> str:
    info = cluster.wait_job(submission_id, timeout)
    logs = cluster.job_logs(submission_id)
    (cluster.root / f"{submission_id}.log").write_text(logs)  # the whole log, for a failure's post-mortem
    assert info["status"] == "SUCCEEDED", f"job {submission_id}: {info['status']} {info.get('message')}\n{logs[-8000:]}"
    return logs


def _logged_steps(logs: str) -> list[int]:
    """Steps of rank 0's progress lines ("step N/total | loss ... | u2i=5.1 sentiment_analysis=6.5") with every
    task's loss."""
    return [int(m.group(1)) for m in STEP_LINE.finditer(logs) if all(p.search(m.group(0)) for p in TASK_LOSS.values())]


def _final_checkpoint(logs: str) -> Path:
    path = Path(logs.strip().splitlines()[-1].strip())
    assert path.is_absolute() and (path / "trainer_state.json").is_file(), f"last log line is not a checkpoint: {path}"
    verify(path)
    return path


def _worker_nodes(cluster) -> dict[str, set[int]]:
    """Node name -> pids of the Ray Train workers that ran there (alive or dead)."""
    names = {n.node_id: n.name for n in cluster.nodes.values()}
    seen: dict[str, set[int]] = {}
    for actor in cluster.actors("RayTrainWorker"):
        seen.setdefault(names.get(actor["node_id"], actor["node_id"]), set()).add(actor["pid"])
    return seen


def _imports_by_node(cluster) -> dict[str, list[str]]:
    """Node name -> where each process of that node found `recfound` (the sitecustomize's import log)."""
    out: dict[str, list[str]] = {}
    for row in cluster.imports():
        assert row["origin"] is not None, f"a process could not find recfound: {row}"
        assert not Path(row["origin"]).resolve().is_relative_to(REPO), f"recfound came from the checkout: {row}"
        out.setdefault(row["node"], []).append(row["origin"])
    return out


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory):
    """Head (3 CPUs) + node `second` (2 CPUs and a `second_node` resource), shared by the next two tests."""
    with local_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        cluster.assert_project_hidden()
        cluster.start_head(num_cpus=3)
        cluster.add_node("second", num_cpus=2, resources={"second_node": 2})
        yield cluster


def test_training_job_runs_across_two_nodes(two_nodes, synthetic_dataset: Path, tmp_path: Path) -> None:
    cluster, storage = two_nodes, tmp_path / "runs"
    assert {n["node_id"] for n in cluster.alive_nodes()} == {n.node_id for n in cluster.nodes.values()}
    entrypoint = _entrypoint(
        synthetic_dataset, storage, "multinode", "max_steps=2", "checkpoint_every=2", "max_failures=0"
    )
    cluster.submit("multinode-1", copy_project(tmp_path / "job"), entrypoint)
    logs = _finished(cluster, "multinode-1", timeout=240)

    # Rank 0's progress lines, one per step with every task's loss, reach the job log (through the worker's logger).
    assert sorted(set(_logged_steps(logs))) == [1, 2], logs[-4000:]
    ckpt = _final_checkpoint(logs)
    assert ckpt.parent == storage / "multinode"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    workers = _worker_nodes(cluster)
    assert set(workers) == {"head", "second"} and all(len(p) == 1 for p in workers.values()), workers
    imports = _imports_by_node(cluster)
    # The driver found recfound in the job's working dir; the Train workers, on both nodes, in the py_modules copy.
    assert any("/runtime_resources/working_dir_files/" in o for o in imports.get("head", [])), imports
    for node in ("head", "second"):
        assert any("/runtime_resources/py_modules_files/" in o for o in imports.get(node, [])), imports


def test_lost_node_resumes_from_latest_checkpoint(two_nodes, synthetic_dataset: Path, tmp_path: Path) -> None:
    """SIGKILL every process of node `second` mid-run; a replacement node joins; the run ends from its checkpoint."""
    cluster, storage, max_steps = two_nodes, tmp_path / "runs", 8
    cluster.submit(
        "lost-node-1",
        copy_project(tmp_path / "job"),
        _entrypoint(
            synthetic_dataset, storage, "lost-node", f"max_steps={max_steps}", "checkpoint_every=2", "max_failures=2"
        ),
    )

    def registered_checkpoint() -> int | None:
        """Step of the newest checkpoint Ray Train has registered (the one a restart resumes from), if any.

        A checkpoint directory in storage is not enough: rank 0 uploads it before the controller has the report
        of every rank, and a node lost in between restarts the run from the previous checkpoint (or none).
        """
        status = cluster.job("lost-node-1")["status"]
        assert status in ("PENDING", "RUNNING"), f"job ended: {status}\n{cluster.job_logs('lost-node-1')[-6000:]}"
        run = storage / "lost-node"
        try:
            latest = json.loads((run / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
            return json.loads((run / latest["checkpoint_dir_name"] / "trainer_state.json").read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):  # not there yet, or caught mid-write
            return None

    resume_step = wait_for("a registered checkpoint", registered_checkpoint, timeout=240, interval=0.25)
    cluster.note(f"checkpoint of step {resume_step} registered")
    cluster.kill_node("second")
    assert cluster.job("lost-node-1")["status"] == "RUNNING", "the run ended before the node was lost: nothing tested"
    cluster.add_node("third", num_cpus=2)  # the workers need a second node again (no node fits both)
    logs = _finished(cluster, "lost-node-1", timeout=300)

    assert resume_step < max_steps
    ckpt = _final_checkpoint(logs)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == max_steps
    history = [json.loads(line)["step"] for line in (ckpt / "metrics.jsonl").read_text().splitlines() if line]
    assert history == list(range(1, max_steps + 1))
    # S2Sched's history survived the restart: one entry per step (update_interval 1), never going back in time.
    steps = [row["step"] for row in json.loads((ckpt / "s2sched.json").read_text())["weights_history"]]
    assert steps == list(range(1, max_steps + 1)), steps
    # It really restarted: a worker died with `second` and the new group used the replacement node.
    workers = _worker_nodes(cluster)
    assert "second" in workers and "third" in workers, workers
    assert any("/runtime_resources/py_modules_files/" in o for o in _imports_by_node(cluster).get("third", []))


def test_autoscaler_adds_nodes_for_a_training_run_and_removes_them(synthetic_dataset: Path, tmp_path: Path) -> None:
    """Ray's fake multi-node autoscaler (real raylets on this machine) grows from 0 to 2 worker nodes for a run.

    The demand is the training job's own: its Train controller asks for 2 workers x {"CPU": 2, "trainer_node": 1}
    (`resources_per_worker`), a resource only the autoscaled node type carries, so only its nodes can host a worker.
    The run must end normally: Ray Train keeps a stopped run's resource request alive for 180 s
    (AUTOSCALING_REQUESTS_EXPIRE_TIME_S), while a finished run withdraws it and the idle nodes go after the 5 s idle
    timeout.
    """
    trainer_type = {
        "resources": {"CPU": 2, "trainer_node": 1, "object_store_memory": 150 * 1024**2},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 2,
    }
    with local_cluster(tmp_path / "cluster") as cluster:
        cluster.start_fake_autoscaling_head(1, {"ray.worker.trainer": trainer_type}, idle_timeout_s=5)
        head = {n["node_id"] for n in cluster.alive_nodes()}
        assert len(head) == 1  # min_workers 0: nothing until there is demand

        def entrypoint(name: str) -> list[str]:
            run = ["max_steps=2", "checkpoint_every=2", "max_failures=0", "resources_per_worker={trainer_node: 1}"]
            return _entrypoint(synthetic_dataset, tmp_path / "runs", name, *run)

        info, logs = cluster.run_job("autoscale", copy_project(tmp_path / "job"), entrypoint, timeout=420)
        (cluster.root / f"{info['submission_id']}.log").write_text(logs)
        assert info["status"] == "SUCCEEDED", f"{info['status']} {info.get('message')}\n{logs[-8000:]}"
        assert sorted(set(_logged_steps(logs))) == [1, 2], logs[-4000:]
        assert json.loads((_final_checkpoint(logs) / "trainer_state.json").read_text())["step"] == 2
        # The run's two Train workers ran at once (one gloo group) on two nodes the autoscaler added for them (the
        # head has no trainer_node resource).
        added = {a["node_id"] for a in cluster.actors("RayTrainWorker") if a["job_id"] == info["job_id"]}
        assert len(added) == 2 and not added & head, (added, head)
        cluster.note(f"autoscaler added {sorted(n[-5:] for n in added)}")

        wait_for("the idle trainer nodes to be removed", lambda: len(cluster.alive_nodes()) == 1, timeout=120)
        cluster.note("autoscaler removed the idle nodes")
        assert added <= {n["node_id"] for n in cluster.nodes_state() if n["state"] == "DEAD"}

"""The test clusters' node start-up (tests/cluster_utils.py) survives Ray's own start-up timeout, and only that.

`ray start` gives up after a fixed 30 s if its raylet has not registered with the GCS; on a loaded 2-core CI
machine that once failed the multi-node tests' fixture before any test ran. The node is then started once more.
Here `_start` runs a plain `sleep` in place of the node's keeper, so no Ray is involved.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from cluster_processes import Node
from cluster_utils import RAY_STARTUP_TIMEOUT, LocalCluster


def _fake_start(started: list[Node]):
    def start(name: str, args: list[str], env: dict[str, str]) -> Node:
        temp_dir = Path(tempfile.mkdtemp(prefix="rftest-", dir="/tmp"))
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        node = Node(name, proc, temp_dir, temp_dir / "log")
        started.append(node)
        return node

    return start


def _failing(messages: list[str]):
    """A readiness check that raises the next message (a node that exited with that log), then passes."""

    def ready(node: Node) -> None:
        if messages:
            raise RuntimeError(f"`ray start` for node {node.name} exited:\n{messages.pop(0)}")
        node.node_id = "up"

    return ready


def test_a_node_that_ray_timed_out_starting_is_discarded_and_started_again(tmp_path, monkeypatch):
    cluster = LocalCluster(tmp_path)
    started: list[Node] = []
    monkeypatch.setattr(cluster, "_start", _fake_start(started))
    node = cluster._bring_up("head", [], {}, _failing([f"Exception: {RAY_STARTUP_TIMEOUT}. This could happen"]))
    try:
        assert [n is node for n in started] == [False, True] and node.node_id == "up"
        first = started[0]
        assert first.proc.poll() is not None, "the node that timed out is still running"
        assert not first.temp_dir.exists(), "the node that timed out left its temp dir"
        assert node.proc.poll() is None
    finally:
        cluster._discard(node)


@pytest.mark.parametrize(
    "messages",
    [["ValueError: bad --resources"], [RAY_STARTUP_TIMEOUT, RAY_STARTUP_TIMEOUT]],
    ids=["another failure", "timed out twice"],
)
def test_any_other_start_failure_is_raised(tmp_path, monkeypatch, messages):
    cluster = LocalCluster(tmp_path)
    started: list[Node] = []
    monkeypatch.setattr(cluster, "_start", _fake_start(started))
    with pytest.raises(RuntimeError, match=messages[-1]):
        cluster._bring_up("head", [], {}, _failing(list(messages)))
    assert len(started) == len(messages)
    for node in started:
        cluster._discard(node)

"""The processes of a test cluster's node, for tests/cluster_utils.py's LocalCluster: the keeper each `ray start`
runs under, the sitecustomize.py its Python processes load, and the /proc walks that find and kill what a node
started (see cluster_utils.py's docstring for why it works this way).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BIN = Path(sys.executable).parent  # the venv's bin: `ray` and the `python` the job entrypoint runs
RAY = str(BIN / "ray")
HOST = "127.0.0.1"

SITECUSTOMIZE = '''\
# Written by tests/cluster_utils.py for a test cluster: hide the editable install of recfound, log its imports.
import json as _json
import os as _os
import sys as _sys

_hidden = {_os.path.realpath(p) for p in _os.environ.get("RF_HIDE_PATHS", "").split(_os.pathsep) if p}
_sys.path[:] = [p for p in _sys.path if not (p and _os.path.realpath(p) in _hidden)]


class _RecfoundImportLog:
    """Finds `recfound` exactly as the path finder would, and appends where it was found to RF_IMPORT_LOG."""

    def find_spec(self, name, path=None, target=None):
        if name != "recfound":
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        record = {"pid": _os.getpid(), "node": _os.environ.get("RF_NODE"), "argv": _sys.argv[:1],
                  "origin": spec.origin if spec is not None else None}
        with open(_os.environ["RF_IMPORT_LOG"], "a") as log:
            log.write(_json.dumps(record) + "\\n")
        return spec


if _os.environ.get("RF_IMPORT_LOG"):
    _sys.meta_path.insert(0, _RecfoundImportLog())
'''


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it, so it is rarely reused soon)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


KEEPER = """\
import ctypes, os, shutil, signal, subprocess, sys, time

libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphans of the node's processes are re-parented to this keeper
libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the test process dies
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)  # the test process died before the line above took effect
temp_dir = sys.argv[2]


def descendants(root):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop(*_):
    for _ in range(100):
        pids = descendants(os.getpid())
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        time.sleep(0.1)
    shutil.rmtree(temp_dir, ignore_errors=True)
    os._exit(0)


signal.signal(signal.SIGTERM, stop)
subprocess.Popen(sys.argv[3:])
while True:  # reap the node's processes (and adopted orphans) until told to stop
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        time.sleep(0.5)
"""


def descendants(root: int) -> list[int]:
    """Live (non-zombie) descendants of process `root`, found through /proc/<pid>/stat parent links."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(root: int, timeout: float = 20.0) -> None:
    """SIGKILL every descendant of `root` (not root itself) until none is left; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while pids := descendants(root):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes under {root} still alive after {timeout}s: {pids}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def wait_for(what: str, predicate: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    """Poll predicate until it returns something truthy; fail with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    node_id: str | None = None
    started: float = field(default_factory=time.monotonic)

    def check_running(self) -> None:
        """Fail fast (with its log) if this node's `ray start` has exited."""
        if self.proc.poll() is not None or (time.monotonic() - self.started > 5 and not descendants(self.proc.pid)):
            raise RuntimeError(f"`ray start` for node {self.name} exited:\n{tail(self.log)}")


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""

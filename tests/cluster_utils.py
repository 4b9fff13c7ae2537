"""Real multi-node Ray clusters on one machine, for the cluster acceptance tests (tests/test_cluster_multinode.py).

Every node is a `ray start --block` process with its own temp dir and its own ports, so a cluster started here
never collides with, and is never stopped together with, another session's cluster; nothing here runs a
machine-wide `ray stop`. Each `ray start` runs under a small keeper process (KEEPER, in cluster_processes.py with
the rest of the process plumbing; the dashboard's REST API is in cluster_dashboard.py) that is a child subreaper:
every process the node spawns (GCS, raylet, agents, workers, the job driver, fake autoscaled nodes) stays its
descendant even after its own parent dies, so "the node's processes" are exactly the keeper's
descendants, found by walking /proc parent links (environment markers and command lines do not work: Ray's
setproctitle overwrites both). Killing a node SIGKILLs those descendants; teardown does the same for every node
and removes the temp dirs. The keeper gets SIGTERM from the kernel when the test process dies, and then kills its
descendants too and removes the node's temp dir, so even a killed pytest leaves no cluster behind.

The project is installed editable in the venv through a plain path entry (site-packages/__editable__.recfound-
*.pth holds the repository's platform/ directory). The cluster's processes get a ``sitecustomize.py`` (first on
PYTHONPATH) that drops that entry from sys.path, so `import recfound` fails on every node unless the job brings
the package itself, as `ray job submit --working-dir` + the driver's runtime_env py_modules do. The same
sitecustomize logs where each process found `recfound` (pid, node name, file) to ``imports.jsonl``: the tests
read it to prove the package came from the runtime_env on every node. Token authentication is on, with a random
token handed over in ``RAY_AUTH_TOKEN`` (nothing is written to ~/.ray).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cluster_dashboard import ClusterDashboard
from cluster_processes import BIN, HOST, KEEPER, RAY, SITECUSTOMIZE, Node, free_port, kill_tree, wait_for

REPO = Path(__file__).resolve().parents[1]
RAY_STARTUP_TIMEOUT = "The current node timed out during startup"


def copy_project(dest: Path) -> Path:
    """What `ray job submit --working-dir` would ship from a checkout: jobs/, platform/ and configs/ only."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for part in ("jobs", "platform", "configs"):
        shutil.copytree(REPO / part, dest / part, ignore=ignore)
    return dest


@dataclass
class LocalCluster(ClusterDashboard):
    """A head node plus worker nodes, each a `ray start --block` process with fresh ports, reached at 127.0.0.1.

    Ray itself advertises this machine's own IP for every node (`ray start` rewrites --node-ip-address=127.0.0.1,
    and a non-head node refuses to start otherwise) and its gRPC servers listen on all interfaces; the tests only
    ever connect to 127.0.0.1, and the dashboard (jobs, state API) listens on 127.0.0.1 only.
    """

    root: Path
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    nodes: dict[str, Node] = field(default_factory=dict)
    gcs_port: int = 0
    dashboard_port: int = 0

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        self.site_dir = self.root / "site"
        self.site_dir.mkdir(exist_ok=True)
        (self.site_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.import_log = self.root / "imports.jsonl"

    def note(self, what: str) -> None:
        """A timestamped line on stdout (pytest shows it for a failed test, or with -s) and in timeline.txt."""
        line = f"[cluster +{time.monotonic() - self.started:6.1f}s] {what}"
        print(line, flush=True)
        with open(self.root / "timeline.txt", "a") as out:
            out.write(line + "\n")

    # -- environment --------------------------------------------------------------------------------------------
    def env(self, node: str | None = None, **extra: str) -> dict[str, str]:
        """The environment of this cluster's processes (and of the `ray` CLI calls that talk to it)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST_"))}
        hidden = str((REPO / "platform").resolve())
        inherited = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        pythonpath = [p for p in inherited if p and os.path.realpath(p) != hidden]
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            PYTHONPATH=os.pathsep.join([str(self.site_dir), *pythonpath]),
            PYTHONNOUSERSITE="1",
            RF_HIDE_PATHS=hidden,
            RF_IMPORT_LOG=str(self.import_log),
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            RAY_DEDUP_LOGS="0",
            # Fewer processes on a small machine: no workers started ahead of time (the jobs' runtime_env needs
            # its own anyway) and no metrics pipeline.
            RAY_enable_worker_prestart="0",
            RAY_prestart_worker_first_driver="0",
            RAY_enable_metrics_collection="0",
            # Ray Data 2.60's parquet reader starts 32 FooterReader actors (32 python processes) per dataset to
            # read footers in parallel; the run reads 2 datasets of 1 small file each.
            RAY_DATA_PARQUET_FOOTER_NUM_ACTORS="1",
            # Notice a dead node in ~3 s instead of ~15 s.
            RAY_health_check_initial_delay_ms="1000",
            RAY_health_check_period_ms="1000",
            RAY_health_check_timeout_ms="1000",
            RAY_health_check_failure_threshold="3",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
        )
        if node:
            env["RF_NODE"] = node
        env.update(extra)
        return env

    def assert_project_hidden(self) -> None:
        """The cluster's python cannot import recfound by itself (the editable install is hidden from it)."""
        probe = subprocess.run(
            [str(BIN / "python"), "-c", "import recfound"],
            env=self.env("probe", RF_IMPORT_LOG=""),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert probe.returncode != 0 and "No module named 'recfound'" in probe.stderr, (
            f"the cluster's python still imports recfound from the checkout:\n{probe.stdout}{probe.stderr}"
        )

    @property
    def gcs_address(self) -> str:
        return f"{HOST}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.dashboard_port}"

    # -- nodes --------------------------------------------------------------------------------------------------
    def _start(self, name: str, args: list[str], env: dict[str, str]) -> Node:
        temp_dir = Path(tempfile.mkdtemp(prefix=f"rf{name[:4]}-", dir="/tmp"))  # short: unix socket paths <= 107
        log = self.root / f"node-{name}.log"
        cmd = [
            RAY,
            "start",
            "--block",
            "--disable-usage-stats",
            f"--node-ip-address={HOST}",
            f"--temp-dir={temp_dir}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            f"--object-store-memory={200 * 1024**2}",
            *args,
        ]
        with open(log, "ab") as out:  # the keeper (own session: a Ctrl-C to pytest is not a node crash) runs cmd
            proc = subprocess.Popen(
                [str(BIN / "python"), "-S", "-c", KEEPER, str(os.getpid()), str(temp_dir), *cmd],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        node = Node(name, proc, temp_dir, log)
        self.nodes[name] = node
        self.note(f"node {name} starting: keeper pid {proc.pid}, temp dir {temp_dir}")
        return node

    def start_head(
        self,
        num_cpus: int,
        resources: dict | None = None,
        autoscaling_config: Path | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 90,
    ) -> Node:
        self.gcs_port, self.dashboard_port = self.gcs_port or free_port(), free_port()
        args = [
            "--head",
            f"--port={self.gcs_port}",
            f"--num-cpus={num_cpus}",
            "--include-dashboard=true",
            f"--dashboard-host={HOST}",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
        ]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        if autoscaling_config:
            args.append(f"--autoscaling-config={autoscaling_config}")

        def ready(head: Node) -> None:
            wait_for("the head's dashboard", self._dashboard_up, timeout, interval=0.5)
            head.node_id = wait_for("the head to register", lambda: self._node_id_of(head), timeout, interval=0.5)

        head = self._bring_up("head", args, env or self.env("head"), ready)
        self.note(f"head up: {head.node_id}")
        return head

    def add_node(self, name: str, num_cpus: int, resources: dict | None = None, timeout: float = 90) -> Node:
        args = [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")

        def ready(node: Node) -> None:
            node.node_id = wait_for(f"node {name} to register", lambda: self._node_id_of(node), timeout, interval=0.5)

        node = self._bring_up(name, args, self.env(name), ready)
        self.note(f"node {name} up: {node.node_id}")
        return node

    def _bring_up(self, name: str, args: list[str], env: dict[str, str], ready: Callable[[Node], None]) -> Node:
        """Start node `name` and wait until `ready` passes; start it once more if `ray start` gave up on its own
        fixed 30-s wait for the raylet to register (Ray's "The current node timed out during startup", hard-coded
        in ray/_private/node.py): seen once in CI, on a loaded 2-core machine, with the head's dashboard already up.
        Any other failure is raised at once."""
        node = self._start(name, args, env)
        try:
            ready(node)
            return node
        except RuntimeError as err:
            if RAY_STARTUP_TIMEOUT not in str(err):
                raise
        self.note(f"node {name}: Ray timed out starting it; starting it again")
        self._discard(node)
        node = self._start(name, args, env)
        ready(node)
        return node

    def _node_id_of(self, node: Node) -> str | None:
        """The id of the one ALIVE node that is not one of the nodes already known (nodes start one at a time)."""
        node.check_running()
        known = {n.node_id for n in self.nodes.values() if n.node_id}
        fresh = [r["node_id"] for r in self.alive_nodes() if r["node_id"] not in known]
        return fresh[0] if len(fresh) == 1 else None

    def fake_autoscaling_config(self, head_cpus: int, worker_types: dict[str, dict], idle_timeout_s: float) -> Path:
        """The autoscaling config `ray.cluster_utils.AutoscalingCluster` would write, for this cluster's GCS port.

        AutoscalingCluster itself cannot be used here: it reads ray/autoscaler/_private/fake_multi_node/
        example.yaml, which the Ray 2.60 wheel does not ship (FileNotFoundError), and its start()/shutdown() run a
        machine-wide `ray stop --force` and the default ports. This is that example's content with our worker types;
        the head must be started with RAY_FAKE_CLUSTER=1 (see start_fake_autoscaling_head).
        """
        self.gcs_port = self.gcs_port or free_port()
        # The address exactly as the head registers it (Ray rewrites 127.0.0.1 to this machine's IP): nodes given
        # another spelling of it make Ray's address="auto" lookups see "multiple active Ray instances".
        from ray._private.services import get_node_ip_address

        gcs_address = f"{get_node_ip_address()}:{self.gcs_port}"
        config = {
            "cluster_name": f"fake-{self.gcs_port}",
            "max_workers": sum(t["max_workers"] for t in worker_types.values()),
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                "launch_multiple": True,
                "gcs_address": gcs_address,
            },
            "available_node_types": {
                **worker_types,
                "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            },
            "head_node_type": "ray.head.default",
            "auth": {},
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_timeout_s / 60,
            "docker": {},
            **{
                key: []
                for key in (
                    "initialization_commands",
                    "setup_commands",
                    "head_setup_commands",
                    "worker_setup_commands",
                    "head_start_ray_commands",
                    "worker_start_ray_commands",
                    "cluster_synced_files",
                    "rsync_exclude",
                    "rsync_filter",
                )
            },
            "file_mounts": {},
            "file_mounts_sync_continuously": False,
        }
        path = self.root / "autoscaling.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start_fake_autoscaling_head(self, head_cpus: int, worker_types: dict[str, dict], idle_timeout_s: float) -> Node:
        """A head whose autoscaler (RAY_FAKE_CLUSTER=1: FakeMultiNodeProvider) adds and removes real raylets here."""
        config = self.fake_autoscaling_config(head_cpus, worker_types, idle_timeout_s)
        env = self.env("head", RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        return self.start_head(head_cpus, autoscaling_config=config, env=env)

    def kill_node(self, name: str) -> None:
        """Hard node failure: SIGKILL the node's raylet, agents and workers at once (no drain, no goodbye)."""
        kill_tree(self.nodes[name].proc.pid)
        self.note(f"node {name} killed")

    def shutdown(self) -> None:
        """SIGKILL every process of every node (workers first: the head's job driver lives under it), then the
        keepers; remove the temp dirs. Raises if a process outlives its SIGKILLs (never seen)."""
        errors = []
        for node in reversed(list(self.nodes.values())):
            try:
                self._discard(node)
            except RuntimeError as err:
                errors.append(err)
        if errors:
            raise RuntimeError(f"test cluster teardown: {errors}")

    def _discard(self, node: Node) -> None:
        """SIGKILL the node's processes, stop its keeper, remove its temp dir (raises if a process survives)."""
        try:
            kill_tree(node.proc.pid)
        finally:
            node.proc.terminate()  # the keeper kills whatever is left under it, removes the temp dir, exits
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(timeout=10)
            for _ in range(5):  # a process killed a moment ago may still have flushed a file
                shutil.rmtree(node.temp_dir, ignore_errors=True)
                if not node.temp_dir.exists():
                    break
                time.sleep(0.5)


@contextlib.contextmanager
def local_cluster(root: Path):
    """A LocalCluster torn down (every process of every node SIGKILLed, temp dirs removed) however the block exits."""
    cluster = LocalCluster(root)
    try:
        yield cluster
    finally:
        cluster.shutdown()

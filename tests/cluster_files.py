"""What the cluster-file checks read, shared by tests/test_cluster_files.py and tests/test_cluster_control_plane.py:
the paths of the cluster deployment files and small readers of them (YAML documents, pyproject, the Dockerfile's
arguments, the commands written in them). Reads files only: nothing here starts Ray, a container or a cloud call.
"""

from __future__ import annotations

import ast
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

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

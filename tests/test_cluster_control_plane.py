"""The control plane of the cluster deployment files: every Ray cluster they define requires Ray's token (from a
Secret, or a file on the launcher's nodes), and the KubeRay manifests' NetworkPolicies, evaluated here with
Kubernetes' ingress semantics against the pods KubeRay will create from them, keep each cluster's control plane to
its own pods. Static checks, like tests/test_cluster_files.py: nothing here starts Ray, a container or a cloud call.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from cluster_files import LAUNCHER, RAYJOB, RAYSERVICE, ROOT, _kuberay_documents, _manifest, _pod_containers, _yaml

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

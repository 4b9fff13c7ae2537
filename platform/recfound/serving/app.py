"""The Ray Serve application: one deployment, ``Model`` (serving/model.py), whose replicas serve the
OpenAI-compatible HTTP API and run the batched engine and item index behind it, so a request takes one hop from
Serve's HTTP proxy to the replica that answers it.

``build_app`` is what serve_config.yaml's ``import_path`` builds; ``roll_out`` switches a running app to another
version in place.
"""

import copy
import os
import time
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from recfound.config import Config
from recfound.serving.index import SearchConfig
from recfound.serving.limits import Limits
from recfound.serving.model import MODEL_DEPLOYMENT, Model
from recfound.serving.proxy import warn_unless_installed
from recfound.serving.registry import VersionNotFound, latest_version

APP_NAME = "recfound"
REGISTRY_ENV = "RECFOUND_REGISTRY"


class AppArgs(Config):
    """Application ``args`` in serve_config.yaml."""

    registry: str | None = None
    """Registry URL; default $RECFOUND_REGISTRY as seen by the Serve controller."""
    cache_dir: str | None = None
    """Where replicas cache versions of a remote registry; default $RECFOUND_CACHE or ~/.cache/recfound."""
    search: SearchConfig = SearchConfig()
    limits: Limits = Limits()


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for ``serve run`` / serve_config.yaml (``import_path: serve.app:app``)."""
    cfg = AppArgs.model_validate(args)
    registry = cfg.registry or os.environ.get(REGISTRY_ENV)
    if not registry:
        raise ValueError(f"no registry: set args.registry in the Serve config or {REGISTRY_ENV}")
    warn_unless_installed()
    search, limits = cfg.search.model_dump(mode="json"), cfg.limits.model_dump()
    return Model.bind(registry, search, cfg.cache_dir, _pin_latest(registry), limits)


def _pin_latest(registry: str) -> str | None:
    """What ``latest`` means for this deployment: the registry's latest version now, resolved once here (in the
    Serve controller) rather than by each replica when it starts, which would mix versions after a publish.
    None for a registry without versions yet: replicas then take the first one published."""
    try:
        return latest_version(registry)
    except VersionNotFound:
        return None


class VersionRefused(RuntimeError):
    """The replicas refused the version being rolled out (it failed to verify or load); they serve the old one."""


def roll_out(version: str, app_name: str = APP_NAME, timeout_s: float = 300.0) -> None:
    """Make a running, config-deployed app serve ``version`` with zero dropped requests.

    Re-applies the app's deployed config with only the Model's ``user_config.version`` changed — the same call
    ``serve deploy`` makes through the dashboard. Serve sees an unchanged code version, so it reconfigures the
    running replicas in place (no restarts); each loads the new version beside the live one and swaps. Returns
    once the deployment is healthy and answers with ``version``. Raises ``VersionRefused`` if the replicas refused
    it, after re-applying the previous config: left naming the refused version, it would make every replica
    started later (a crashed one's replacement, an autoscaled one) fail to load and never come up.
    """
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    details = client.get_serve_details()
    apps = {name: app.get("deployed_app_config") for name, app in details.get("applications", {}).items()}
    if apps.get(app_name) is None:
        raise RuntimeError(f"Serve app {app_name!r} is not running from a config (serve run/deploy serve_config.yaml)")
    previous = copy.deepcopy(apps)
    deployments = apps[app_name].setdefault("deployments", [])
    entry = next((d for d in deployments if d.get("name") == MODEL_DEPLOYMENT), None)
    if entry is None:
        entry = {"name": MODEL_DEPLOYMENT}
        deployments.append(entry)
    entry["user_config"] = {**(entry.get("user_config") or {}), "version": version}
    target_capacity = details.get("target_capacity")
    _deploy(client, apps, target_capacity)
    try:
        _wait_for_version(app_name, version, timeout_s)
    except VersionRefused:
        _deploy(client, previous, target_capacity)
        raise


def _deploy(client: Any, apps: dict[str, Any], target_capacity: float | None) -> None:
    """Apply these app configs, as ``serve deploy`` does (the apps without a config are left out)."""
    from ray.serve.schema import ServeDeploySchema

    client.deploy_apps(
        ServeDeploySchema.model_validate(
            {"applications": [a for a in apps.values() if a is not None], "target_capacity": target_capacity}
        )
    )


def _wait_for_version(app_name: str, version: str, timeout_s: float) -> None:
    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications[app_name].deployments[MODEL_DEPLOYMENT].status
        info = _info(handle) if status == "HEALTHY" else None
        if info is not None:
            if info["version"] == version:
                return
            if info["last_error"] and repr(version) in info["last_error"]:
                raise VersionRefused(f"the Serve app refused {version}: {info['last_error']}")
        time.sleep(0.5)
    raise TimeoutError(f"Serve app {app_name!r} did not report version {version} within {timeout_s:.0f}s")


def _info(handle: DeploymentHandle) -> dict[str, Any] | None:
    """A Model replica's ``info``; None when that replica died answering (Serve replaces it): ask again later."""
    try:
        return handle.info.remote().result()
    except RayActorError:
        return None

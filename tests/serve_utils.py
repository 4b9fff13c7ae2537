"""The shipped Serve app on a local Ray, started the way operators do (``serve run`` of serve/serve_config.yaml),
for the tests that call it over HTTP (tests/test_serve_app.py, tests/test_serve_chaos.py).

The registry holds one version, v1, of the fake engine from test_serve_engine; each test module edits the shipped
config (limits, replicas, extra apps) before it is run, so what runs is the operators' file plus that edit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import ray
import yaml
from ray import serve
from test_serve_engine import make_artifact, make_dataset, publish_fake

from recfound.serving.proxy import PROXY_CALLBACK

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
STARTUP_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_app(root: Path, configure: Callable[[dict[str, Any]], None]) -> Iterator[dict[str, Any]]:
    """Registry with v1 -> local Ray (2 CPUs) -> `serve run --non-blocking` of the shipped config on a free port,
    edited by ``configure``; yields once every app answers /healthz, and stops Serve and Ray afterwards.

    Yields the base ``url``, the Ray ``address``, and the ``model``, ``data`` and ``registry`` directories (to
    publish more versions from)."""
    model, data, registry = make_artifact(root / "model"), make_dataset(root / "data"), root / "registry"
    publish_fake(model, data, str(registry))
    config = yaml.safe_load((REPO / "serve" / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port = free_port()
    configure(config)
    (root / "serve.yaml").write_text(yaml.safe_dump(config))
    saved = dict(os.environ)
    # Ray workers inherit this environment: the registry, the API token, tests/ for the fake engine, and the proxy
    # callback operators set where Ray starts (serve_config.yaml).
    os.environ.update(
        RECFOUND_REGISTRY=str(registry),
        RECFOUND_API_TOKEN=TOKEN,
        RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=PROXY_CALLBACK,
        PYTHONPATH=os.pathsep.join([str(REPO / "tests"), saved.get("PYTHONPATH", "")]),
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        address = ray.get_runtime_context().gcs_address
        serve_cli = Path(sys.executable).parent / "serve"
        subprocess.run(
            [str(serve_cli), "run", "--non-blocking", "--address", address, str(root / "serve.yaml")],
            cwd=REPO,
            check=True,
            capture_output=True,
            timeout=STARTUP_TIMEOUT_S,
        )
        url = f"http://127.0.0.1:{port}"
        for application in config["applications"]:
            wait_healthy(url + application["route_prefix"].rstrip("/"), STARTUP_TIMEOUT_S)
        yield {"url": url, "address": address, "model": model, "data": data, "registry": registry}
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout_s}s")


def post(app: dict[str, Any], path: str, body: Any, token: str | None = TOKEN) -> httpx.Response:
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {token}"} if token else {})
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{app['url']}{path}", content=content, headers=headers, timeout=30)

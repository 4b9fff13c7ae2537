"""The Serve app the HTTP tests of tests/test_serve_app.py and tests/test_serve_app_errors.py call: the shipped
config (serve_utils.serve_app) with small limits, plus the same app again under route_prefix /api so auth is checked
where a prefix moves every path; both use the fake engine from test_serve_engine.

A test module binds the fixtures by assignment (``app, client = serve_app_fixtures.app, serve_app_fixtures.client``):
pytest finds them there, each module gets its own app (module scope), and no unused import is left for the linter.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI
from serve_utils import TOKEN, serve_app

MAX_INPUTS = 4
PREFIX = "/api"
MAX_CHARS = 2000
MAX_BODY = 64 * 1024
PREFIXED_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The shipped config with a test port and small limits, plus the app again under route_prefix /api."""
    with serve_app(tmp_path_factory.mktemp("serve"), _configure) as served:
        yield served


def _configure(config: dict[str, Any]) -> None:
    config["applications"][0]["args"]["limits"].update(
        max_inputs=MAX_INPUTS, max_chars=MAX_CHARS, max_body_bytes=MAX_BODY
    )
    config["applications"].append(_prefixed(config["applications"][0]))


def _prefixed(shipped: dict[str, Any]) -> dict[str, Any]:
    """The shipped app under route_prefix /api, reserving no CPUs so it fits beside the first on 2; its Model takes
    one request at a time with one queued and its requests time out after PREFIXED_TIMEOUT_S, for overload tests."""
    app = copy.deepcopy(shipped) | {"name": "recfound-prefixed", "route_prefix": PREFIX}
    app["args"]["limits"]["request_timeout_s"] = PREFIXED_TIMEOUT_S
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = {"num_cpus": 0}
        if deployment["name"] == "Model":
            deployment |= {
                "max_ongoing_requests": 1,
                "max_queued_requests": 1,
                "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
            }
    return app


@pytest.fixture(scope="module")
def client(app: dict[str, Any]) -> OpenAI:
    return OpenAI(base_url=f"{app['url']}/v1", api_key=TOKEN, max_retries=0, timeout=30)

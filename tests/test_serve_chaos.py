"""Chaos on the served app: a roll-out under load survives a Model replica killed half-way, and a corrupt version
is refused by every replica, those started after the refusal included.

The shipped config run as operators run it (tests/serve_utils.py), with REPLICAS fixed Model replicas so a kill
leaves one serving; clients post /v1/embeddings and /v1/recommend for the whole roll-out and must see only 200s.
Requests the killed replica held are sent again by the HTTP proxy's middleware (serving/proxy.py); its limit is
checked in process in tests/test_serving_proxy.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, NamedTuple

import httpx
import pytest
import ray
from ray.serve.context import _get_global_client
from serve_utils import AUTH, post, serve_app
from test_serve_engine import SLOW_PROMPT, SLOW_S, make_artifact, publish_fake

from recfound.serving.app import APP_NAME, VersionRefused, roll_out
from recfound.serving.model import MODEL_DEPLOYMENT
from recfound.serving.responses import VERSION_HEADER

pytestmark = pytest.mark.slow

REPLICAS = 2
CLIENTS = 4
LOAD_DELAY_S = 3.0
"""How long each replica takes to load the new version: the window the kill falls in."""
SERVE_NAMESPACE = "serve"
"""The Ray namespace of Serve's actors (its replicas among them)."""
RECOVERY_S = 90.0
REQUESTS = [
    ("/v1/embeddings", {"model": "recfound-q2i", "input": ["espresso coffee", "red socks"]}),
    ("/v1/recommend", {"task": "q2i", "query": "stainless steel kettle", "k": 2}),
]
SLOW = ("/v1/completions", {"model": "recfound-gen", "prompt": f"{SLOW_PROMPT} take your time", "max_tokens": 4})
"""A generation the fake engine spends SLOW_S on: a few are in flight when the busiest replica is killed, so it
surely dies holding accepted requests (the fast load alone leaves one there only by chance)."""


class Answer(NamedTuple):
    path: str
    status: int
    """0 when the connection failed before any answer."""
    version: str | None
    error: str = ""
    """The start of a failed answer's body (or the connection error)."""


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with serve_app(tmp_path_factory.mktemp("chaos"), _fixed_replicas) as served:
        yield served


def _fixed_replicas(config: dict[str, Any]) -> None:
    """The Model at REPLICAS replicas, not autoscaled (a kill must not be mistaken for a scale-down), half a CPU
    each so a replacement fits on 2 CPUs before Ray frees the killed one's share."""
    model = next(d for d in config["applications"][0]["deployments"] if d["name"] == MODEL_DEPLOYMENT)
    del model["autoscaling_config"]
    model |= {"num_replicas": REPLICAS, "ray_actor_options": {"num_cpus": 0.5}}


def _model_details() -> dict[str, Any]:
    return _get_global_client().get_serve_details()["applications"][APP_NAME]


def _running_replicas() -> list[str]:
    """Actor names of the Model's running replicas, as the Serve controller lists them."""
    replicas = _model_details()["deployments"][MODEL_DEPLOYMENT]["replicas"]
    return sorted(r["actor_name"] for r in replicas if r["state"] == "RUNNING")


def _deployed_version() -> str:
    """The version the app's deployed config names (what replicas started from now on load)."""
    deployments = _model_details()["deployed_app_config"]["deployments"]
    return next(d for d in deployments if d["name"] == MODEL_DEPLOYMENT)["user_config"]["version"]


def _kill_the_busiest_replica() -> tuple[str, int]:
    """SIGKILL-like death, no restart by Ray, of the running Model replica with the most requests in flight (the
    count Serve's router probes replicas for), so that Serve has to notice and replace it and the kill drops
    accepted requests whenever there are any. Returns its actor name and that count."""
    actors = {name: ray.get_actor(name, namespace=SERVE_NAMESPACE) for name in _running_replicas()}
    in_flight = {name: ray.get(actor.get_num_ongoing_requests.remote()) for name, actor in actors.items()}
    victim = max(in_flight, key=in_flight.__getitem__)
    ray.kill(actors[victim], no_restart=True)
    return victim, in_flight[victim]


def _wait_for(what: str, predicate: Callable[[], bool], timeout_s: float = RECOVERY_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.25)


def _ask(http: httpx.Client, url: str, path: str, body: dict[str, Any]) -> Answer:
    try:
        return _answer(path, http.post(url + path, json=body))
    except httpx.HTTPError as err:
        return Answer(path, 0, None, repr(err))


def _answer(path: str, resp: httpx.Response) -> Answer:
    return Answer(path, resp.status_code, resp.headers.get(VERSION_HEADER), "" if resp.is_success else resp.text[:300])


@contextmanager
def _load(url: str) -> Iterator[list[Answer]]:
    """CLIENTS threads posting REQUESTS in turn, back to back, until the block ends: every answer, in order."""
    answers: list[Answer] = []
    stop = threading.Event()

    def client(offset: int) -> None:
        with httpx.Client(timeout=30, headers=AUTH) as http:
            n = offset
            while not stop.is_set():
                answers.append(_ask(http, url, *REQUESTS[n % len(REQUESTS)]))
                n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        yield answers
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)


def _versions(app: dict[str, Any], n: int = 20) -> set[str | None]:
    """The versions ``n`` sequential requests are answered with (enough to reach every replica)."""
    answers = [post(app, path, body) for _ in range(n // len(REQUESTS)) for path, body in REQUESTS]
    assert all(resp.status_code == 200 for resp in answers), [(r.status_code, r.text[:200]) for r in answers]
    return {resp.headers.get(VERSION_HEADER) for resp in answers}


def test_roll_out_under_load_survives_a_killed_replica(app: dict[str, Any]) -> None:
    """v1 -> v2 while CLIENTS clients post; once the config names v2 (both replicas loading it, LOAD_DELAY_S) and
    slow generations are running, the busiest replica is killed. Every request is answered 200 with v1 or v2, those
    the dead replica had accepted included; Serve replaces it; at the end every replica answers v2."""
    slow_model = make_artifact(app["model"].parent / "slow_model", load_delay_s=LOAD_DELAY_S)
    new = publish_fake(slow_model, app["data"], str(app["registry"]))
    assert len(_running_replicas()) == REPLICAS and _versions(app) == {"v1"} and new == "v2"
    with _load(app["url"]) as answers, ThreadPoolExecutor(1 + 2 * REPLICAS) as pool:
        _wait_for("first answers", lambda: len(answers) >= 2 * CLIENTS)
        rolling = pool.submit(roll_out, new, timeout_s=RECOVERY_S)
        _wait_for("the config names v2", lambda: _deployed_version() == new)
        slow = [pool.submit(post, app, *SLOW) for _ in range(2 * REPLICAS)]
        time.sleep(SLOW_S / 3)  # accepted by the replicas, still generating
        victim, dropped = _kill_the_busiest_replica()
        rolling.result()
        _wait_for("a replacement replica", lambda: len(set(_running_replicas()) - {victim}) == REPLICAS)
    answers += [_answer(SLOW[0], done.result()) for done in slow]
    failed = [a for a in answers if a.status != 200]
    assert dropped > 0, "the killed replica held no request: the test checked nothing"
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:10]}"
    assert {a.version for a in answers} == {"v1", "v2"}, answers
    assert _versions(app) == {new}


def test_corrupt_version_is_refused_and_every_replica_keeps_the_old(app: dict[str, Any]) -> None:
    """A version whose weights rot after publishing: roll_out raises, both replicas keep answering the live
    version, and so does a replica started after the refusal (the config must not name the refused version)."""
    live = _versions(app)
    assert len(live) == 1
    new = publish_fake(app["model"], app["data"], str(app["registry"]))
    weights = app["registry"] / "versions" / new / "weights" / "adapter.bin"
    rotten = bytearray(weights.read_bytes())
    rotten[:16] = bytes(b ^ 0xFF for b in rotten[:16])
    weights.write_bytes(bytes(rotten))
    with pytest.raises(VersionRefused, match=f"refused {new}.*does not match its SHA-256"):
        roll_out(new, timeout_s=RECOVERY_S)
    assert _versions(app) == live and _deployed_version() in live
    victim, _ = _kill_the_busiest_replica()
    _wait_for("a replacement replica", lambda: len(set(_running_replicas()) - {victim}) == REPLICAS)
    assert _versions(app) == live

"""The Serve app on local Ray, started the way operators do (``serve run serve/serve_config.yaml``), called with
the real ``openai`` client and plain HTTP; then a corrupted version is refused and a hot swap drops nothing.

One Ray start for the whole module (2 CPUs): the shipped app, plus the same app again under route_prefix /api so
auth is checked where a prefix moves every path; both use the fake engine from test_serve_engine.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from openai import NotFoundError, OpenAI
from ray import serve
from serve_utils import AUTH, REPO, TOKEN, post, serve_app
from test_serve_engine import (
    CATALOGUE,
    FAKE_ENGINE,
    SLOW_PROMPT,
    SLOW_S,
    fake_vectors,
    make_artifact,
    publish_fake,
    write_manifest,
)

from recfound.data.templates import item_text
from recfound.serving.app import APP_NAME, roll_out
from recfound.serving.model import MODEL_DEPLOYMENT

pytestmark = pytest.mark.slow

MAX_INPUTS = 4
LOAD_DELAY_S = 2.0
PREFIX = "/api"
MAX_CHARS = 2000
MAX_BODY = 64 * 1024
PREFIXED_TIMEOUT_S = 1.0
FUZZ_CASES = 25  # generated requests per operation: bounded, about 10 s per operation on the fake engine


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


def test_one_deployment_answers_http_itself(app: dict[str, Any], client: OpenAI) -> None:
    """One hop: the app is the Model deployment alone, its replicas the HTTP ingress (no gateway in between)."""
    deployments = serve.status().applications[APP_NAME].deployments
    assert set(deployments) == {MODEL_DEPLOYMENT} and deployments[MODEL_DEPLOYMENT].status == "HEALTHY"
    assert client.embeddings.create(model="recfound-q2i", input="mug").model_extra["version"] == "v1"


def test_openai_embeddings(client: OpenAI) -> None:
    raw = client.embeddings.with_raw_response.create(model="recfound-q2i", input=["coffee beans", "running shoes"])
    assert raw.headers["x-recfound-version"] == "v1"
    out = raw.parse()
    vectors = np.array([d.embedding for d in out.data], dtype=np.float32)
    np.testing.assert_allclose(vectors, fake_vectors(["coffee beans", "running shoes"], 64), atol=1e-6)
    assert out.model == "recfound-q2i" and out.usage.prompt_tokens == 4 and out.model_extra["version"] == "v1"
    floats = client.embeddings.create(model="recfound-i2i", input="red socks", encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, fake_vectors(["red socks"], 64)[0], atol=1e-6)


def test_openai_completions_and_chat(client: OpenAI) -> None:
    out = client.completions.create(model="recfound-gen", prompt=["hello there world", "ab"], max_tokens=5)
    assert [c.text for c in out.choices] == ["v1 answer_generation says hello there", "v1 answer_generation says ab"]
    assert [c.finish_reason for c in out.choices] == ["length", "stop"]
    assert out.system_fingerprint == "v1" and out.usage.prompt_tokens == 4
    stopped = client.completions.create(model="recfound-query_rewriting", prompt="red", max_tokens=9, stop=" says")
    assert stopped.choices[0].text == "v1 query_rewriting" and stopped.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(
        model="recfound-item_profile",
        max_tokens=20,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe the mug."}],
    )
    assert chat.choices[0].message.content == "v1 item_profile says Be brief. Describe the mug."
    assert chat.choices[0].message.role == "assistant" and chat.system_fingerprint == "v1"


def test_guided_choice_answers_one_of_the_choices(client: OpenAI) -> None:
    choices = ["positive", "negative", "red running shoes"]
    out = client.completions.create(
        model="recfound-sentiment_analysis",
        prompt=["I love these red shoes", "meh"],
        max_tokens=1,
        extra_body={"guided_choice": choices},
    )
    # FakeEngine picks the choice sharing most words; a whole choice comes back, max_tokens=1 notwithstanding
    assert [c.text for c in out.choices] == ["red running shoes", "positive"]
    assert {c.finish_reason for c in out.choices} == {"stop"} and out.usage.completion_tokens == 4
    chunks = list(
        client.chat.completions.create(
            model="recfound-gen",
            stream=True,
            extra_body={"guided_choice": choices},
            messages=[{"role": "user", "content": "negative review"}],
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "negative"


def test_streaming_matches_non_streaming(client: OpenAI, app: dict[str, Any]) -> None:
    messages = [{"role": "user", "content": "Describe the red running shoes"}]
    whole = client.chat.completions.create(model="recfound-gen", messages=messages, max_tokens=30)
    chunks = list(client.chat.completions.create(model="recfound-gen", messages=messages, max_tokens=30, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop" and {c.model_extra["version"] for c in chunks} == {"v1"}
    text = list(client.completions.create(model="recfound-gen", prompt="one two", max_tokens=3, stream=True))
    assert "".join(c.choices[0].text for c in text) == "v1 answer_generation says"
    assert text[-1].choices[0].finish_reason == "length"
    raw = post(app, "/v1/completions", {"model": "recfound-gen", "prompt": "x", "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.endswith("data: [DONE]\n\n") and raw.headers["x-recfound-version"] == "v1"
    for stop in (["says"], ["ration sa", "zzz"], ["v1"]):  # a stop string across pieces, and at the very start
        kwargs = {"model": "recfound-gen", "prompt": "one two three", "max_tokens": 8, "stop": stop}
        whole_text = client.completions.create(**kwargs).choices[0]
        streamed = list(client.completions.create(**kwargs, stream=True))
        assert "".join(c.choices[0].text for c in streamed) == whole_text.text
        assert streamed[-1].choices[0].finish_reason == whole_text.finish_reason == "stop"


def test_tokens_stream_as_they_are_decoded(client: OpenAI) -> None:
    """The slow fake spreads a completion's words over SLOW_S: the first arrives long before the last (a replayed
    finished text would deliver them together at the end)."""
    arrivals: list[tuple[float, str]] = []
    start = time.monotonic()
    for chunk in client.completions.create(
        model="recfound-gen", prompt=f"{SLOW_PROMPT} a b c d e f", max_tokens=10, stream=True
    ):
        if chunk.choices[0].text:
            arrivals.append((time.monotonic() - start, chunk.choices[0].text))
    assert "".join(t for _, t in arrivals) == f"v1 answer_generation says {SLOW_PROMPT} a b c d e f"
    assert arrivals[-1][0] - arrivals[0][0] > SLOW_S / 2, arrivals


def test_models_and_health(client: OpenAI, app: dict[str, Any]) -> None:
    names = [m.id for m in client.models.list()]
    assert {"recfound-u2i", "recfound-q2i", "recfound-i2i", "recfound-gen", "recfound-item_profile"} <= set(names)
    health = httpx.get(f"{app['url']}/healthz", headers=AUTH).json()
    assert health["status"] == "ok" and health["version"] == "v1" and health["last_error"] is None
    with pytest.raises(NotFoundError, match="does not embed"):
        client.embeddings.create(model="gpt-4", input="x")


def _items(resp: httpx.Response, version: str = "v1") -> list[str]:
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["version"] == version == resp.headers["x-recfound-version"]
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    return [i["item_id"] for i in body["items"]]


def test_recommend(app: dict[str, Any]) -> None:
    q2i = post(app, "/v1/recommend", {"task": "q2i", "query": "espresso coffee", "k": 2})
    assert _items(q2i)[0] == "i4" and q2i.json()["items"][0]["title"] == "espresso coffee beans"
    u2i = _items(post(app, "/v1/recommend", {"task": "u2i", "history": ["i3", "i4"], "k": 6}))
    assert u2i[0] == "i5" and not {"i3", "i4"} & set(u2i)  # coffee buyer -> the mug; own items excluded
    kept = _items(post(app, "/v1/recommend", {"task": "u2i", "history": ["i4"], "k": 1, "exclude_history": False}))
    assert kept == ["i4"]
    i2i = _items(post(app, "/v1/recommend", {"task": "i2i", "item_id": "i1", "k": 3}))
    assert i2i[0] == "i2" and "i1" not in i2i


def test_rank_orders_every_candidate_by_the_chosen_scorer(app: dict[str, Any]) -> None:
    """Embedding scores are the cosine of the query's and the indexed item's vectors (the fake engine embeds by
    shared words); generative q2i scores each title as the answer to the query-rewriting prompt (the fake scores
    shared words); ties keep the request's order; u2i generative letters the candidates."""
    texts = {item: item_text(title, cats, brand) for item, title, cats, brand in CATALOGUE}
    candidates = ["i1", "i4", "i5", "i6"]
    resp = post(app, "/v1/rank", {"task": "q2i", "query": "espresso coffee mug", "candidates": candidates})
    assert resp.status_code == 200 and resp.headers["x-recfound-version"] == resp.json()["version"], resp.text
    got = {item["item_id"]: item["score"] for item in resp.json()["items"]}
    query = fake_vectors(["espresso coffee mug"], 64)[0]
    expected = {item: float(fake_vectors([texts[item]], 64)[0] @ query) for item in candidates}
    assert list(got) == sorted(candidates, key=lambda i: -expected[i]) and set(got) == set(candidates)
    assert all(abs(got[i] - expected[i]) < 1e-5 for i in candidates)
    generative = post(
        app,
        "/v1/rank",
        {"task": "q2i", "query": "stainless steel kettle", "scorer": "generative", "candidates": ["i4", "i6", "i5"]},
    )
    assert [(i["item_id"], i["score"]) for i in generative.json()["items"]] == [("i6", 3.0), ("i4", 0.0), ("i5", 0.0)]
    u2i = post(
        app, "/v1/rank", {"task": "u2i", "history": ["i3"], "candidates": ["i2", "i5", "i1"], "scorer": "generative"}
    )
    assert u2i.status_code == 200 and sorted(_items(u2i)) == ["i1", "i2", "i5"], u2i.text
    i2i = _items(post(app, "/v1/rank", {"task": "i2i", "item_id": "i1", "candidates": ["i4", "i2", "i3"]}))
    assert i2i[0] == "i2"


LONG = " ".join(["word"] * 80)
BAD_REQUESTS = [
    # (path, body, token, status, code, message fragment)
    ("/v1/embeddings", {"model": "recfound-nope", "input": "x"}, TOKEN, 404, "model_not_found", "does not embed"),
    ("/v1/embeddings", {"model": "recfound-gen", "input": "x"}, TOKEN, 404, "model_not_found", "does not embed"),
    ("/v1/completions", {"model": "recfound-q2i", "prompt": "x"}, TOKEN, 404, "model_not_found", "does not generate"),
    ("/v1/embeddings", {"model": "recfound-q2i", "input": ""}, TOKEN, 400, "empty_input", "input[0] is an empty"),
    ("/v1/embeddings", {"model": "recfound-q2i", "input": []}, TOKEN, 400, "empty_input", "input is empty"),
    ("/v1/embeddings", {"model": "recfound-q2i", "input": ["a"] * 5}, TOKEN, 400, "too_many_inputs", "at most 4"),
    ("/v1/embeddings", {"model": "recfound-q2i", "input": LONG}, TOKEN, 400, "context_length_exceeded", "64 tokens"),
    (
        "/v1/completions",
        {"model": "recfound-gen", "prompt": " ".join(["w"] * 60), "max_tokens": 10},
        TOKEN,
        400,
        "context_length_exceeded",
        "60 in the prompt + 10 max_tokens",
    ),
    (
        "/v1/completions",
        {"model": "recfound-gen", "prompt": "x", "max_tokens": 5000},
        TOKEN,
        400,
        "invalid_value",
        "at most 512",
    ),
    ("/v1/completions", {"model": "recfound-gen", "prompt": "x", "n": 2}, TOKEN, 400, "unsupported_value", "n=1"),
    (
        "/v1/completions",
        {"model": "recfound-gen", "prompt": "x", "guided_choice": []},
        TOKEN,
        400,
        "invalid_value",
        "guided_choice has 0 choices",
    ),
    (
        "/v1/completions",
        {"model": "recfound-gen", "prompt": "x", "guided_choice": ["a", "a"]},
        TOKEN,
        400,
        "invalid_value",
        "distinct",
    ),
    (
        "/v1/completions",
        {"model": "recfound-gen", "prompt": " ".join(["w"] * 60), "guided_choice": ["a b c d e"]},
        TOKEN,
        400,
        "context_length_exceeded",
        "60 in the prompt + 5 in the longest guided_choice",
    ),
    (
        "/v1/chat/completions",
        {
            "model": "recfound-gen",
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        },
        TOKEN,
        400,
        "invalid_value",
        "end with a user message",
    ),
    ("/v1/embeddings", {"model": "recfound-q2i", "input": 123}, TOKEN, 400, "invalid_type", "input"),
    ("/v1/embeddings", {"input": "x"}, TOKEN, 400, "missing_field", "model: Field required"),
    ("/v1/embeddings", '{"model": "recfound-q2i", "input": ', TOKEN, 400, "invalid_json", "malformed JSON"),
    ("/v1/recommend", {"task": "u2i", "history": ["i1", "zz9"]}, TOKEN, 400, "unknown_item", "'zz9'"),
    ("/v1/recommend", {"task": "i2i", "item_id": "nope"}, TOKEN, 400, "unknown_item", "'nope'"),
    ("/v1/recommend", {"task": "q2i", "query": "  "}, TOKEN, 400, "empty_input", "needs a non-empty 'query'"),
    ("/v1/recommend", {"task": "q2i", "query": "x", "k": "5"}, TOKEN, 400, "invalid_type", "k: Input should be"),
    ("/v1/recommend", {"task": "q2i", "query": "x", "k": 1000}, TOKEN, 400, "invalid_value", "at most 100"),
    ("/v1/recommend", {"task": "x2i", "query": "x"}, TOKEN, 400, "invalid_type", "task"),
    ("/v1/recommend", {"task": "q2i", "query": "x", "colour": 1}, TOKEN, 400, "invalid_type", "colour"),
    ("/v1/recommend", {"task": "q2i", "query": LONG}, TOKEN, 400, "context_length_exceeded", "query[0]"),
    ("/v1/rank", {"task": "q2i", "query": "x", "candidates": []}, TOKEN, 400, "empty_input", "candidates is empty"),
    ("/v1/rank", {"task": "q2i", "query": "x", "candidates": ["i1", "i1"]}, TOKEN, 400, "invalid_value", "distinct"),
    ("/v1/rank", {"task": "q2i", "query": "x", "candidates": ["i1", "zz9"]}, TOKEN, 400, "unknown_item", "'zz9'"),
    (
        "/v1/rank",
        {"task": "q2i", "query": "x", "candidates": ["i1"], "scorer": "bm25"},
        TOKEN,
        400,
        "invalid_type",
        "scorer",
    ),
    (
        "/v1/rank",
        {"task": "i2i", "item_id": "i1", "candidates": ["i2"], "scorer": "generative"},
        TOKEN,
        400,
        "unsupported_value",
        "use scorer=embedding for i2i",
    ),
    ("/v1/rank", {"task": "u2i", "candidates": ["i1"]}, TOKEN, 400, "empty_input", "needs a non-empty 'history'"),
    (
        "/v1/rank",
        {"task": "q2i", "query": " ".join(["w"] * 60), "candidates": ["i4"], "scorer": "generative"},
        TOKEN,
        400,
        "context_length_exceeded",
        "in the longest candidate",
    ),
    ("/v1/embeddings", {"model": "recfound-q2i", "input": "x"}, None, 401, "invalid_api_key", "bearer token"),
    ("/v1/embeddings", {"model": "recfound-q2i", "input": "x"}, "wrong", 401, "invalid_api_key", "bearer token"),
    ("/v1/nothing", {}, TOKEN, 404, None, "Not Found"),
    # Bounded work: every cap refuses before the model runs.
    (
        "/v1/embeddings",
        {"model": "recfound-q2i", "input": ["ok", "x" * (MAX_CHARS + 1)]},
        TOKEN,
        400,
        "string_too_long",
        f"input[1] has {MAX_CHARS + 1} characters; at most {MAX_CHARS}",
    ),
    (
        "/v1/completions",
        {"model": "recfound-gen", "prompt": "x" * (MAX_CHARS + 1)},
        TOKEN,
        400,
        "string_too_long",
        "prompt[0]",
    ),
    (
        "/v1/completions",
        {"model": "recfound-gen", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
        TOKEN,
        400,
        "too_many_inputs",
        "5 stop strings; at most 4",
    ),
    (
        "/v1/chat/completions",
        {
            "model": "recfound-gen",
            "messages": [{"role": "system", "content": "s"}] * 40 + [{"role": "user", "content": "u"}],
        },
        TOKEN,
        400,
        "too_many_inputs",
        "41 messages; at most 32",
    ),
    (
        "/v1/chat/completions",
        {"model": "recfound-gen", "messages": [{"role": "user", "content": "y" * 5000}]},
        TOKEN,
        400,
        "string_too_long",
        "messages[0]",
    ),
    ("/v1/recommend", {"task": "q2i", "query": "q" * (MAX_CHARS + 1)}, TOKEN, 400, "string_too_long", "query[0]"),
    (
        "/v1/embeddings",
        {"model": "recfound-q2i", "input": ["x"] * 40_000},
        TOKEN,
        413,
        "request_too_large",
        f"over {MAX_BODY} bytes",
    ),
]


@pytest.mark.parametrize(("path", "body", "token", "status", "code", "fragment"), BAD_REQUESTS)
def test_bad_input_gets_openai_error(
    app: dict[str, Any], path: str, body: Any, token: str | None, status: int, code: str | None, fragment: str
) -> None:
    resp = post(app, path, body, token)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and fragment in error["message"]


def test_a_chunked_body_over_the_cap_is_cut_off(app: dict[str, Any]) -> None:
    """No Content-Length to refuse by: the upload is read only up to the cap, then answered 413."""

    def body() -> Iterator[bytes]:
        yield b'{"model": "recfound-q2i", "input": ['
        for _ in range(2 * MAX_BODY // 1000):
            yield b'"' + b"x" * 998 + b'",'
        yield b'"x"]}'

    resp = httpx.post(
        f"{app['url']}/v1/embeddings", content=body(), headers={**AUTH, "content-type": "application/json"}, timeout=30
    )
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"]["code"] == "request_too_large"


def test_replica_survives_bad_input(app: dict[str, Any]) -> None:
    assert httpx.get(f"{app['url']}/healthz").json()["version"] == "v1"
    wrong_method = httpx.get(f"{app['url']}/v1/embeddings", headers=AUTH)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["message"] == "Method Not Allowed"


PROTECTED = [
    ("GET", "/v1/models"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/recommend"),
    ("POST", "/v1/rank"),
    ("GET", "/v1/nothing"),
    ("GET", "/nothing"),
    ("GET", "/docs"),
    ("GET", "/redoc"),
    ("GET", "/openapi.json"),
]


def test_schema_fuzzing_finds_no_server_error(app: dict[str, Any]) -> None:
    """schemathesis generates requests from the published /openapi.json (bearer token set), a bounded number per
    operation: no answer is a 5xx, and every error is OpenAI's error object. The schema lists the model names, so
    generated embedding and completion requests reach the model (some answer 200)."""
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{app['url']}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/v1/embeddings",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/recommend",
        "/v1/rank",
    }
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        _fuzz(operation, app["url"], statuses.setdefault(operation.label, set()))
    assert statuses and all(statuses.values())
    assert 200 in statuses["POST /v1/embeddings"] and 200 in statuses["POST /v1/completions"], statuses


def _fuzz(operation: Any, url: str, seen: set[int]) -> None:
    """FUZZ_CASES generated requests to one operation: each under 500, each error in OpenAI's shape."""
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=FUZZ_CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def call(case: Any) -> None:
        resp = case.call(base_url=url, headers=AUTH, timeout=30)
        seen.add(resp.status_code)
        assert resp.status_code < 500, (operation.label, resp.status_code, resp.text[:300])
        if resp.status_code >= 400:
            assert set(resp.json()["error"]) == {"message", "type", "param", "code"}, resp.text[:300]

    call()


@pytest.mark.parametrize("prefix", ["", PREFIX])
def test_every_route_but_healthz_needs_the_token(app: dict[str, Any], prefix: str) -> None:
    """Auth is by route template relative to the root_path, so a Serve route_prefix cannot open the API."""
    base = app["url"] + prefix
    tokens = {"no token": {}, "wrong token": {"authorization": "Bearer wrong"}}
    answers = {
        (path, token): httpx.request(method, base + path, headers=headers, timeout=30)
        for method, path in PROTECTED
        for token, headers in tokens.items()
    }
    open_ = {key: resp.status_code for key, resp in answers.items() if resp.status_code != 401}
    assert not open_, f"answered without a valid token: {open_}"
    assert {resp.json()["error"]["code"] for resp in answers.values()} == {"invalid_api_key"}
    assert httpx.get(f"{base}/v1/models", headers=AUTH).status_code == 200
    assert httpx.get(f"{base}/openapi.json", headers=AUTH).json()["info"]["title"] == "recfound"
    assert httpx.get(f"{base}/docs", headers=AUTH).status_code == 200


@pytest.mark.parametrize("prefix", ["", PREFIX])
def test_anonymous_health_says_only_up_and_version(app: dict[str, Any], prefix: str) -> None:
    """Probes carry no token: they get status and version; last_error (local paths) etc. need the token."""
    for headers in ({}, {"authorization": "Bearer wrong"}):
        resp = httpx.get(f"{app['url']}{prefix}/healthz", headers=headers)
        version = resp.headers["x-recfound-version"]
        assert resp.status_code == 200 and resp.json() == {"status": "ok", "version": version}, resp.text
    detail = httpx.get(f"{app['url']}{prefix}/healthz", headers=AUTH).json()
    assert {"status", "version", "last_error", "items", "context_length"} <= set(detail)


def test_corrupted_version_is_refused_and_previous_keeps_serving(app: dict[str, Any]) -> None:
    assert publish_fake(app["model"], app["data"], str(app["registry"])) == "v2"
    weights = app["registry"] / "versions" / "v2" / "weights" / "adapter.bin"
    weights.write_bytes(b"bit rot")
    with pytest.raises(RuntimeError, match="refused v2.*weights/adapter.bin does not match its SHA-256"):
        roll_out("v2", timeout_s=60)
    health = httpx.get(f"{app['url']}/healthz", headers=AUTH).json()
    assert health["version"] == "v1" and "does not match its SHA-256" in health["last_error"]
    assert _items(post(app, "/v1/recommend", {"task": "q2i", "query": "stainless steel kettle", "k": 1})) == ["i6"]


def test_hot_swap_drops_no_request(app: dict[str, Any]) -> None:
    """`jobs/publish.py ... serve=<address>` while a client loop runs: every request answered, old then new,
    and none waits for the new version to load (it takes LOAD_DELAY_S, in the background)."""
    before = httpx.get(f"{app['url']}/healthz").json()["version"]
    slow_model = make_artifact(app["model"].parent / "slow_model", load_delay_s=LOAD_DELAY_S)
    results: list[tuple[int, str | None, float]] = []
    published: dict[str, str] = {}
    ready = threading.Event()

    def loop() -> None:
        ready.wait(timeout=120)
        deadline = time.monotonic() + 30
        with httpx.Client(timeout=30, headers={"authorization": f"Bearer {TOKEN}"}) as http:
            while len(results) < 200 and time.monotonic() < deadline:
                start = time.monotonic()
                resp = http.post(f"{app['url']}/v1/embeddings", json={"model": "recfound-u2i", "input": "mug"})
                version = resp.json().get("version") if resp.status_code == 200 else None
                results.append((resp.status_code, version, time.monotonic() - start))
                if sum(v == published.get("version") for _, v, _ in results) >= 10:
                    return
                time.sleep(0.05)

    client_thread = threading.Thread(target=loop)
    client_thread.start()
    job = subprocess.Popen(  # inherits the fixture's environment: tests/ on PYTHONPATH for the fake engine
        [
            sys.executable,
            str(REPO / "jobs" / "publish.py"),
            f"model={slow_model}",
            f"data={app['data']}",
            f"registry={app['registry']}",
            f"serve={app['address']}",
            f"engine={FAKE_ENGINE}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert job.stdout is not None
        published["version"] = new = job.stdout.readline().strip()  # published; the roll-out starts now
        ready.set()
        out, err = job.communicate(timeout=120)
        assert job.returncode == 0, err
        assert out.strip() == f"serving {new}"
    finally:
        ready.set()
        client_thread.join(timeout=60)
        job.kill()
    assert new != before and all(status == 200 for status, _, _ in results), results
    versions = [v for _, v, _ in results]
    assert versions == [before] * versions.count(before) + [new] * versions.count(new), versions
    assert versions.count(before) > 0 and versions.count(new) > 0
    assert max(latency for _, _, latency in results) < LOAD_DELAY_S, "a request waited for the new version to load"


def test_overload_answers_fast_503s_and_slow_requests_504(app: dict[str, Any]) -> None:
    """The /api app's Model runs one request with one queued and times out after PREFIXED_TIMEOUT_S: of several
    concurrent long generations, those beyond the queue get 503 at once, from the replica's queue at the proxy (not
    after a wait), and the admitted ones 504, all in OpenAI's error schema; the replica then answers normally."""
    body = {"model": "recfound-gen", "prompt": f"{SLOW_PROMPT} tell me", "max_tokens": 4}
    answers: list[httpx.Response] = []

    def send() -> None:
        answers.append(httpx.post(f"{app['url']}{PREFIX}/v1/completions", json=body, headers=AUTH, timeout=30))

    threads = [threading.Thread(target=send) for _ in range(5)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    codes = sorted((resp.status_code, resp.json()["error"]["code"]) for resp in answers)
    assert (503, "overloaded") in codes and (504, "timeout") in codes, codes
    assert {status for status, _ in codes} <= {503, 504}
    refused = [resp.elapsed.total_seconds() for resp in answers if resp.status_code == 503]
    assert max(refused) < PREFIXED_TIMEOUT_S, f"503s took {refused} s: they waited for a slot"
    time.sleep(SLOW_S)  # the abandoned generations finish in their threads
    resp = post(app, f"{PREFIX}/v1/completions", {"model": "recfound-gen", "prompt": "hello", "max_tokens": 4})
    assert resp.status_code == 200, resp.text


def test_the_real_engine_under_serve_answers_as_it_does_in_process(app: dict[str, Any], client: OpenAI) -> None:
    """Every other test here runs the fake engine: this one rolls out a tiny real GRM and checks that what Serve
    answers equals the same engine called in process (embeddings, greedy and streamed completions, recommend,
    generative rank)."""
    from recfound.model.backbone import BackboneConfig
    from recfound.model.formats import Side
    from recfound.model.grm import GRM
    from recfound.serving.engine import load_engine
    from recfound.serving.index import ItemIndex, SearchConfig, user_text
    from recfound.serving.rank import rank_question
    from recfound.serving.registry import read_version, resolve

    model_dir = app["model"].parent / "grm"
    backbone = BackboneConfig(name="tiny", max_query_len=160, max_passage_len=192, max_generative_len=256)
    GRM.build(backbone).save_pretrained(str(model_dir / "adapter"))
    write_manifest(model_dir)
    version = publish_fake(model_dir, app["data"], str(app["registry"]), engine="recfound.serving.engine:GRMEngine")
    roll_out(version, timeout_s=120)
    local = resolve(str(app["registry"]), version)
    engine, index = load_engine(local), ItemIndex.load(local, SearchConfig())
    instruction = read_version(local)["instructions"]["q2i"]["query"]

    texts = ["red running shoes", "a mug for coffee"]
    served = np.array([d.embedding for d in client.embeddings.create(model="recfound-q2i", input=texts).data])
    direct = engine.embed("q2i", texts, instruction, Side.QUERY)
    assert (np.sum(served * direct, axis=1) >= 0.9999).all()

    prompt = "Describe the kettle."
    whole = client.completions.create(model="recfound-item_profile", prompt=prompt, max_tokens=6)
    assert whole.choices[0].text == engine.generate("item_profile", [prompt], 6, 0.0)[0]
    streamed = client.completions.create(model="recfound-item_profile", prompt=prompt, max_tokens=6, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text

    hits = index.search("q2i", direct[0], 3)
    assert _items(post(app, "/v1/recommend", {"task": "q2i", "query": texts[0], "k": 3}), version) == [
        index.item_ids[p] for p, _ in hits
    ]
    candidates = ["i1", "i4", "i6"]
    titles = [index.titles[index.position[c]] for c in candidates]
    for task, query in [("q2i", {"query": texts[0]}), ("u2i", {"history": ["i2", "i3"]})]:
        text = texts[0] if task == "q2i" else user_text([index.titles[index.position[i]] for i in ("i2", "i3")], 3)
        question = rank_question(task, text, titles, engine.tasks)  # u2i: a candidate_ranking question each
        scores = question.scores(engine.choice_scores(question.task, question.prompts, question.choices))
        ranked = post(app, "/v1/rank", {"task": task, **query, "candidates": candidates, "scorer": "generative"})
        assert _items(ranked, version) == [candidates[i] for i in np.argsort(-scores, kind="stable")]

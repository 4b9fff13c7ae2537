"""The Serve app's refusals, over HTTP: every bad input answered with an OpenAI error object (never a 5xx), every
cap enforced before the model runs (a chunked body over the limit included), requests generated from the published
schema (schemathesis), and the token required on every route but /healthz, with and without a route_prefix.

One Ray start for the whole module (2 CPUs): the app of tests/serve_app_fixtures.py, as in tests/test_serve_app.py
but its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import serve_app_fixtures
from serve_app_fixtures import MAX_BODY, MAX_CHARS, PREFIX
from serve_utils import AUTH, TOKEN, post

pytestmark = pytest.mark.slow

FUZZ_CASES = 25  # generated requests per operation: bounded, about 10 s per operation on the fake engine

app = serve_app_fixtures.app  # this module's Serve app


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
    (  # counted before the messages are validated: the cap, not the first bad message, is what the client learns
        "/v1/chat/completions",
        {"model": "recfound-gen", "messages": [{"role": "robot"}] * 2_000},
        TOKEN,
        400,
        "too_many_inputs",
        "2000 messages; at most 32",
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

    # derandomize: the same cases every run (random draws once produced no valid completion request in CI)
    @settings(
        max_examples=FUZZ_CASES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
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

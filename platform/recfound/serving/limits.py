"""Per-request bounds of the API (the ``limits`` of serve_config.yaml): what one request may ask for before it is
refused, so no single request can cost unbounded model time or memory.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from recfound.config import Config
from recfound.serving.errors import ApiError


class Limits(Config):
    """Per-request bounds: a request over one is refused (413 for the body, 400 naming the cap otherwise) before it
    costs model time, and one that runs too long is answered 504."""

    max_body_bytes: int = Field(8 * 2**20, ge=1024)
    """Largest request body; a bigger one is refused with 413 before it is read (by its Content-Length) or as soon
    as the bytes read pass the cap (chunked uploads)."""
    max_chars: int = Field(32_768, ge=1)
    """Most characters in one input text, prompt, query, chat message, stop string or guided choice: bounds the
    tokenisation work a request causes before its token count can be checked against the context."""
    max_messages: int = Field(32, ge=1)
    """Most messages in one chat request."""
    max_stops: int = Field(4, ge=0)
    """Most stop strings in one completion request (OpenAI's limit)."""
    request_timeout_s: float = Field(300.0, gt=0.0)
    """A request the model has not answered within this many seconds gets a 504 and is cancelled."""

    max_inputs: int = Field(256, ge=1)
    """Most texts in one /v1/embeddings request or prompts in one /v1/completions request."""
    max_tokens: int = Field(512, ge=1)
    """Most completion tokens one request may ask for."""
    max_k: int = Field(100, ge=1)
    """Most items /v1/recommend returns."""
    max_history: int = Field(200, ge=1)
    """Most item ids in a /v1/recommend or /v1/rank history (only the last `max_history` of the dataset are
    rendered)."""
    max_candidates: int = Field(1000, ge=1)
    """Most candidates one /v1/rank request orders."""


def check_chars(texts: list[str], limits: Limits, param: str) -> None:
    """Refuse any text longer than ``max_chars`` (named by its position) before it is tokenised."""
    for i, text in enumerate(texts):
        if len(text) > limits.max_chars:
            raise ApiError(
                400, f"{param}[{i}] has {len(text)} characters; at most {limits.max_chars}", param, "string_too_long"
            )


class _Configured:
    """The limits of this process's API, set once by the Model replica as it starts (``configure_limits``). Module
    level, not ``api.state``: the request schemas check counts while FastAPI validates a body, before any route (or
    request state) is reached."""

    limits: Limits | None = None


_configured = _Configured()


def configure_limits(limits: Limits) -> None:
    _configured.limits = limits


def configured_limits() -> Limits:
    """The replica's limits; the documented defaults in a process that is not a replica (a test, a client)."""
    return _configured.limits or Limits()


def check_count(value: Any, cap: int, param: str, noun: str) -> None:
    """Refuse a list longer than ``cap`` by its length alone. Run before the list's elements are validated, so a
    request carrying 100k inputs or 10k chat messages costs a ``len``, not 100k validations (25 ms of the replica's
    event loop for 10k messages)."""
    if isinstance(value, list) and len(value) > cap:
        raise ApiError(400, f"{len(value)} {noun}; at most {cap}", param, "too_many_inputs")

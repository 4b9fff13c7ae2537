"""Request schemas refuse an over-long list by its length, before its elements are validated: a 10k-message chat
request costs a len(), not 10k message validations (issue 14's abuse suite), and a client learns the cap it broke
even when the elements are bad too."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from recfound.serving.errors import ApiError
from recfound.serving.limits import Limits, configure_limits, configured_limits
from recfound.serving.schemas import ChatRequest, CompletionRequest, EmbeddingRequest, RankRequest, RecommendRequest

LIMITS = Limits(max_inputs=3, max_messages=2, max_stops=1, max_history=2, max_candidates=2)
BAD_ELEMENT: Any = {"role": "robot"}
"""Invalid as a chat message, a string, an item id: validating it would fail with a type error."""

OVER = [
    (EmbeddingRequest, {"model": "recfound-q2i", "input": [BAD_ELEMENT] * 4}, "input", "4 inputs; at most 3"),
    (CompletionRequest, {"model": "recfound-gen", "prompt": [BAD_ELEMENT] * 4}, "prompt", "4 prompts; at most 3"),
    (
        CompletionRequest,
        {"model": "recfound-gen", "prompt": "x", "stop": [BAD_ELEMENT] * 2},
        "stop",
        "2 stop strings; at most 1",
    ),
    (
        CompletionRequest,
        {"model": "recfound-gen", "prompt": "x", "guided_choice": [BAD_ELEMENT] * 4},
        "guided_choice",
        "4 guided choices; at most 3",
    ),
    (ChatRequest, {"model": "recfound-gen", "messages": [BAD_ELEMENT] * 10_000}, "messages", "10000 messages"),
    (RecommendRequest, {"task": "u2i", "history": [BAD_ELEMENT] * 3}, "history", "3 history items; at most 2"),
    (
        RankRequest,
        {"task": "q2i", "query": "q", "candidates": [BAD_ELEMENT] * 3},
        "candidates",
        "3 candidates; at most 2",
    ),
]


@pytest.fixture(autouse=True)
def small_limits() -> Iterator[None]:
    """This module's caps, then the process's own again: later tests construct requests too."""
    before = configured_limits()
    configure_limits(LIMITS)
    yield
    configure_limits(before)


@pytest.mark.parametrize(("schema", "body", "param", "message"), OVER)
def test_an_over_long_list_is_refused_by_its_length(schema: Any, body: dict, param: str, message: str) -> None:
    with pytest.raises(ApiError) as refused:
        schema.model_validate(body)
    assert (refused.value.status, refused.value.code, refused.value.param) == (400, "too_many_inputs", param)
    assert message in refused.value.message


def test_lists_within_the_caps_validate() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = ChatRequest.model_validate({"model": "recfound-gen", "messages": messages})
    assert chat.prompt(LIMITS) == "be brief\n\nhi"
    assert EmbeddingRequest.model_validate({"model": "recfound-q2i", "input": ["a"] * 3}).texts(LIMITS) == ["a"] * 3

"""Response wire formats: OpenAI's embeddings, completions and chat answers (whole and streamed) and /v1/recommend's,
each carrying the registry version that produced it (also in the ``VERSION_HEADER`` header), so a client can tell
which model answered during a roll-out.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import numpy as np
from pydantic import BaseModel

from recfound.serving.schemas import EncodingFormat

VERSION_HEADER = "x-recfound-version"


class RecommendedItem(BaseModel):
    item_id: str
    title: str
    score: float


class RecommendResponse(BaseModel):
    task: str
    version: str
    items: list[RecommendedItem]


def embedding_response(
    model: str, version: str, vectors: np.ndarray, tokens: int, fmt: EncodingFormat
) -> dict[str, Any]:
    """``base64`` is little-endian float32 bytes: the openai client asks for it by default and decodes it."""

    def encode(v: np.ndarray) -> list[float] | str:
        return base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()

    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage, "version": version}


def completion_id(chat: bool) -> str:
    """A fresh id with OpenAI's prefix for the object (chat or text completion), as clients that log ids expect."""
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def completion_response(
    model: str,
    version: str,
    texts: list[str],
    finish: list[str],
    prompt_tokens: int,
    completion_tokens: int,
    chat: bool,
) -> dict[str, Any]:
    """A whole (non-streamed) completion or chat completion in OpenAI's format, one choice per text."""
    if chat:
        choices = [
            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f, "logprobs": None}
            for i, (t, f) in enumerate(zip(texts, finish, strict=True))
        ]
    else:
        choices = [
            {"index": i, "text": t, "finish_reason": f, "logprobs": None}
            for i, (t, f) in enumerate(zip(texts, finish, strict=True))
        ]
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return {
        "id": completion_id(chat),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
        "system_fingerprint": version,
        "version": version,
    }


def stream_chunk(
    cid: str, model: str, version: str, index: int, piece: str | None, finish: str | None, chat: bool
) -> dict[str, Any]:
    """One OpenAI streaming chunk; for chat, ``piece=None`` opens the message with the assistant role."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if piece is None else {}
        if piece:
            delta["content"] = piece
        choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": index, "text": piece or "", "finish_reason": finish, "logprobs": None}
    return {
        "id": cid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "system_fingerprint": version,
        "version": version,
    }

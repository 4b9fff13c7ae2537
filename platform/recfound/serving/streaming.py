"""Server-sent events for streamed completions, and cutting a stream at its stop strings as it arrives."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any


def apply_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to its first stop string (excluded), and whether one was found."""
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class StopScanner:
    """Cuts a stream of pieces at the first stop string, as ``apply_stop`` cuts the whole text: it holds back the
    last ``len(longest stop) - 1`` characters, which could be the start of a stop string still arriving."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was reached: then nothing after it is ever sent)."""
        self._pending += piece
        text, stopped = apply_stop(self._pending, self._stops)
        if stopped:
            self._pending = ""
            return text, True
        cut = max(len(self._pending) - self._hold, 0)
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return text, False

    def flush(self) -> str:
        """What was held back, once the stream has ended without a stop."""
        text, self._pending = self._pending, ""
        return text


async def sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """OpenAI's stream framing: one ``data:`` line per event, then ``[DONE]``."""
    async for event in events:
        yield f"data: {json.dumps(event)}\n\n"
    yield "data: [DONE]\n\n"

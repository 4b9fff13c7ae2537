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
    """Cuts a stream of pieces at the first stop string, as ``apply_stop`` cuts the whole text.

    It holds back every tail of the text so far that is the start of a stop string still arriving, and cuts at a
    stop string found only when no such tail starts before it: with stops "a" and " aa", the text " a" may yet
    become " aa", which the whole text would cut earlier.
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = stops
        self._pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was reached: then nothing after it is ever sent)."""
        self._pending += piece
        pending, open_at = self._pending, self._open_at()
        found = [pending.find(s) for s in self._stops if s in pending]
        if found and min(found) <= open_at:
            self._pending = ""
            return pending[: min(found)], True
        safe = min([open_at, *found])
        self._pending = pending[safe:]
        return pending[:safe], False

    def _open_at(self) -> int:
        """Where the earliest tail of the pending text that a stop string starts with (and is longer than) begins;
        the text's length when there is none."""
        pending = self._pending
        for start in range(len(pending)):
            tail = pending[start:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self._stops):
                return start
        return len(pending)

    def flush(self) -> tuple[str, bool]:
        """What was held back, cut at a stop string it holds, once the stream has ended; and whether it was cut."""
        text, self._pending = self._pending, ""
        return apply_stop(text, self._stops)


async def sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """OpenAI's stream framing: one ``data:`` line per event, then ``[DONE]``."""
    async for event in events:
        yield f"data: {json.dumps(event)}\n\n"
    yield "data: [DONE]\n\n"

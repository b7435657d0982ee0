"""How often a row's text is handed to its client.

Every hand-over is a message to the server process, a wake-up of its event loop and an
SSE chunk to encode, write and parse (with the engine in a thread, also GIL time taken
from the worker); on a fast model that costs more than the decoding. So a row's first
text goes out at once (time to first token), and after that text is held for up to the
request's interval; a non-streamed request only needs its answer at the end.
"""

from __future__ import annotations

import math


class TextPacer:
    def __init__(self, interval: float) -> None:
        if interval < 0 or math.isnan(interval):
            raise ValueError("the interval must be >= 0 seconds (math.inf: only at the end)")
        self._interval = interval
        self._held: list[str] = []
        self._last_release: float | None = None

    def push(self, text: str, now: float) -> str:
        """Add newly decoded text (called every step, often with none: a partial
        character, or whitespace and stop-string prefixes held back); returns what
        should go to the client now ('' if held)."""
        if text:
            self._held.append(text)
        if not self._held:
            return ""
        if self._last_release is not None and now - self._last_release < self._interval:
            return ""
        self._last_release = now
        return self.drain()

    def drain(self) -> str:
        """Everything still held (at the end of the row)."""
        text = "".join(self._held)
        self._held.clear()
        return text

"""How often a row's text is handed to its client.

Every hand-over wakes the client's event loop, which then competes with the engine's
worker for the CPU and the GIL; on a fast model that costs more than the decoding. So a
row's first text goes out at once (time to first token), and after that text is held for
up to the request's interval; a non-streamed request only needs its answer at the end.
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
        """Add newly decoded text; returns what should go to the client now ('' if held)."""
        if not text:
            return ""
        self._held.append(text)
        if self._last_release is not None and now - self._last_release < self._interval:
            return ""
        self._last_release = now
        return self.drain()

    def release_due(self, now: float) -> str:
        """Held text whose interval has passed, even if nothing new arrived."""
        if not self._held or self._last_release is None:
            return ""
        if now - self._last_release < self._interval:
            return ""
        self._last_release = now
        return self.drain()

    def release_early(self) -> str:
        """Held text of a stream, before a pause of unknown length (a long prefill); a
        whole-answer request (interval math.inf) keeps its text for the end."""
        if math.isinf(self._interval):
            return ""
        if self._held:
            self._last_release = None  # the next text goes out at once
        return self.drain()

    def drain(self) -> str:
        """Everything still held (at the end of the row)."""
        text = "".join(self._held)
        self._held.clear()
        return text

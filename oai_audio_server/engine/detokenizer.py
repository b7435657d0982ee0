"""Incremental detokenization that never emits half a character, a stop string or
whitespace that the final answer will not have.

The official ``chat`` decodes all output bytes with ``errors="replace"`` and strips the
result. Feeding the same bytes through Python's incremental UTF-8 decoder gives the same
characters, so the deltas of a stream always add up to the non-streamed answer.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class IncrementalText:
    def __init__(
        self, token_bytes: Sequence[bytes], *, stop: Sequence[str] = (), strip: bool = True
    ) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self._strip = strip
        self._text = ""
        self._emitted_to = 0  # index in _text up to which deltas were sent
        self._started = not strip  # leading whitespace is dropped until real text arrives
        self._search_from = 0
        self.stopped = False

    @property
    def text(self) -> str:
        return self._text

    def push(self, token_id: int) -> str:
        """Add one token; return the text now safe to send (possibly empty).

        After a stop string appears, ``stopped`` is true and the text is cut before it.
        """
        self._text += self._decoder.decode(self._token_bytes[token_id])
        return self._advance(final=False)

    def finish(self) -> str:
        """Flush what is left when generation ends for any reason."""
        if not self.stopped:
            self._text += self._decoder.decode(b"", final=True)
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if not self.stopped and self._stop:
            cut = self._find_stop()
            if cut is not None:
                self._text = self._text[:cut]
                self.stopped = True
                final = True
        safe_end = len(self._text) if final else len(self._text) - self._holdback
        if not self._started:
            stripped = self._text[self._emitted_to : max(safe_end, self._emitted_to)].lstrip()
            if not stripped:
                self._emitted_to = max(self._emitted_to, safe_end) if safe_end > 0 else 0
                return ""
            self._emitted_to = safe_end - len(stripped)
            self._started = True
        end = safe_end
        if self._strip:
            end = len(self._text[:safe_end].rstrip())
        if end <= self._emitted_to:
            return ""
        delta = self._text[self._emitted_to : end]
        self._emitted_to = end
        return delta

    def _find_stop(self) -> int | None:
        hits = [i for s in self._stop if (i := self._text.find(s, self._search_from)) >= 0]
        self._search_from = max(0, len(self._text) - self._holdback)
        return min(hits) if hits else None

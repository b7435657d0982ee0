"""Special tokens out of model text, and timestamp tokens into timed spans.

The model's text arrives with its special tokens spelled out (``<|0.00|>``, ``<|en|>``,
``<|endoftext|>``, ...). None of them may reach a client. Everything here works one
character at a time, so cleaning a stream delta by delta gives exactly the same text as
cleaning the whole answer at once (a stream adds up to the non-streamed reply).

Rules, in order:

1. ``<|body|>`` with a body of 1 to 32 characters, none of them whitespace, ``<``, ``>``
   or ``|``, is a special token: it is removed (a timestamp token when the body is a
   number, such as ``1.23``).
2. A ``<|`` that does not become a token loses its ``|``, and a ``|`` right after an
   emitted ``<`` is dropped: the text handed out never contains ``<|``, so removing a
   token can never join two halves into a new one.
3. Leading and trailing whitespace is dropped; a whitespace run that had a token
   removed inside it shrinks to its first character (``"a <|1.0|> b"`` -> ``"a b"``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_TOKEN_BODY = 32
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Marker:
    """A special token removed from the text; ``seconds`` is set for timestamp tokens."""

    body: str

    @property
    def seconds(self) -> float | None:
        return float(self.body) if _NUMBER.fullmatch(self.body) else None


Piece = str | Marker


def _body_char(char: str) -> bool:
    return not char.isspace() and char not in "<>|"


class SpecialTokenSplitter:
    """Split text into plain text and removed special tokens, fed in any chunks."""

    def __init__(self) -> None:
        self._held = ""  # "", "<", "<|body" or "<|body|": a token that may still complete
        self._last_out = ""

    def feed(self, text: str) -> list[Piece]:
        pieces: list[Piece] = []
        out: list[str] = []
        for char in text:
            self._step(char, out, pieces)
        self._flush_text(out, pieces)
        return pieces

    def finish(self) -> list[Piece]:
        pieces: list[Piece] = []
        out: list[str] = []
        self._release(out)
        self._flush_text(out, pieces)
        return pieces

    def _emit(self, text: str, out: list[str]) -> None:
        for char in text:
            if char == "|" and self._last_out == "<":
                continue
            out.append(char)
            self._last_out = char

    def _release(self, out: list[str]) -> None:
        """Give up on the held text: it was not a token. Its ``<|`` loses the ``|``."""
        held = self._held
        self._held = ""
        if held.startswith("<|"):
            held = "<" + held[2:]
        self._emit(held, out)

    def _flush_text(self, out: list[str], pieces: list[Piece]) -> None:
        if out:
            pieces.append("".join(out))
            out.clear()

    def _step(self, char: str, out: list[str], pieces: list[Piece]) -> None:
        held = self._held
        if not held:
            if char == "<":
                self._held = "<"
            else:
                self._emit(char, out)
        elif held == "<":
            if char == "|":
                self._held = "<|"
            else:
                self._release(out)
                self._step(char, out, pieces)
        elif held.endswith("|") and len(held) > 2:  # "<|body|": only ">" completes it
            if char == ">":
                self._held = ""
                self._flush_text(out, pieces)
                pieces.append(Marker(held[2:-1]))
            else:
                self._release(out)
                self._step(char, out, pieces)
        elif char == "|" and len(held) > 2:
            self._held = held + "|"
        elif _body_char(char) and len(held) - 2 < MAX_TOKEN_BODY:
            self._held = held + char
        else:
            self._release(out)
            self._step(char, out, pieces)


class TextCleaner:
    """Streaming cleaner: ``push`` raw deltas, get the clean text that is safe to send."""

    def __init__(self) -> None:
        self._splitter = SpecialTokenSplitter()
        self._started = False
        self._pending_space = ""
        self._marker_in_space = False

    def push(self, raw: str) -> str:
        return self._apply(self._splitter.feed(raw))

    def finish(self) -> str:
        return self._apply(self._splitter.finish())

    def _apply(self, pieces: list[Piece]) -> str:
        out: list[str] = []
        for piece in pieces:
            if isinstance(piece, Marker):
                if self._started:
                    self._marker_in_space = True
                continue
            for char in piece:
                if char.isspace():
                    if self._started:
                        self._pending_space += char
                    continue
                if self._pending_space:
                    space = self._pending_space
                    out.append(space[0] if self._marker_in_space else space)
                self._pending_space = ""
                self._marker_in_space = False
                self._started = True
                out.append(char)
        return "".join(out)


def clean_text(raw: str) -> str:
    """The whole answer at once; equal to the concatenated output of a TextCleaner."""
    cleaner = TextCleaner()
    return cleaner.push(raw) + cleaner.finish()


def split_pieces(raw: str) -> list[Piece]:
    splitter = SpecialTokenSplitter()
    return splitter.feed(raw) + splitter.finish()


@dataclass(frozen=True)
class TimedSpan:
    """Text with times in seconds, relative to the start of its audio segment."""

    start: float
    end: float
    text: str


def timed_spans(raw: str, duration: float) -> list[TimedSpan]:
    """Cut ``raw`` into spans at its timestamp tokens.

    Text between two timestamps runs from the first to the second (Whisper's
    ``<|0.00|> a<|1.20|><|1.20|> b<|2.00|>`` and the single-token style
    ``<|0.00|> a<|1.20|> b<|2.00|>`` both work). Text with no timestamp before it starts
    where the previous span ended (or at 0); with none after it, it ends where the next
    span starts (or at ``duration``). Times are clamped to ``[0, duration]`` and made
    monotonic. Without any timestamp the result is one span over the whole duration.
    Spans with no text after cleaning are dropped.
    """
    opened: list[tuple[float | None, float | None, str]] = []
    open_time: float | None = None
    last_time: float | None = None
    buffer: list[str] = []

    def close(end: float | None) -> None:
        text = clean_text("".join(buffer))
        buffer.clear()
        if text:
            opened.append((open_time if open_time is not None else last_time, end, text))

    saw_timestamp = False
    for piece in split_pieces(raw):
        if isinstance(piece, str):
            buffer.append(piece)
            continue
        seconds = piece.seconds
        if seconds is None:
            buffer.append(" ")  # a removed non-time token still separates words
            continue
        saw_timestamp = True
        if clean_text("".join(buffer)):
            close(seconds)
            open_time = None
        else:
            buffer.clear()
            open_time = seconds
        last_time = seconds
    close(None)

    if not saw_timestamp:
        text = clean_text(raw)
        return [TimedSpan(0.0, max(duration, 0.0), text)] if text else []

    def clamp(value: float) -> float:
        return min(max(value, 0.0), max(duration, 0.0))

    spans: list[TimedSpan] = []
    previous_end = 0.0
    for index, (start, end, text) in enumerate(opened):
        if end is None:
            following = next((s for s, _, _ in opened[index + 1 :] if s is not None), None)
            end = following if following is not None else duration
        begin = clamp(start if start is not None else previous_end)
        begin = max(begin, previous_end)
        finish = max(clamp(end), begin)
        spans.append(TimedSpan(begin, finish, text))
        previous_end = finish
    return spans

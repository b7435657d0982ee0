"""Long strings taken out of a JSON request body before it is decoded.

Decoding a 45 MiB body is one call that holds the GIL, and with it the event loop, for
tens of milliseconds; so is building the Python string of its base64 audio. A request's
long strings are its audio (``input_audio.data``, ``audio_url.url``, ``file.file_data``)
and, in an attack or by mistake, its text. A vectorised scan, a MiB at a time, finds
every run of at least ``MIN_LENGTH`` plain bytes (printable ASCII but ``"`` and ``\\``,
plus the escape ``\\/``) that is the whole value of a ``"data"``, ``"url"``,
``"file_data"``, ``"text"`` or ``"content"`` key:

* audio values (``data``, ``url``, ``file_data``) are replaced by a placeholder and kept
  as bytes, which the audio decoder reads in steps;
* text values (``text``, ``content``) stay, but their size is known before decoding,
  so text that cannot fit the model's window is refused without decoding it.

Why the match is always a whole string value: an unescaped quote that starts
``"data"`` followed by ``:`` opens that key (had it closed a string, ``data`` would stand
outside any string: invalid JSON), so the quote after the colon opens the value; a run
without quotes, and without backslashes but in ``\\/``, then ends exactly at the value's
closing quote. A body that is not valid JSON stays invalid, and a valid one decodes to
the same value, placeholders aside.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from oai_audio_server.memory import AnonymousBuffer

MIN_LENGTH = 64 * 1024  # shorter strings cost well under a millisecond to decode
STEP = 1024 * 1024  # bytes per step of any scan or copy that holds the GIL
AUDIO_KEYS = (b"data", b"url", b"file_data")
TEXT_KEYS = (b"text", b"content")
_QUOTE, _BACKSLASH, _SLASH = ord('"'), ord("\\"), ord("/")
_PLAIN = np.zeros(256, dtype=bool)
_PLAIN[0x20:0x7F] = True
_PLAIN[[_QUOTE, _BACKSLASH]] = False
# The key before a value's opening quote; the key's own opening quote must not be escaped.
_KEY = re.compile(rb'(?<!\\)"(data|url|file_data|text|content)"[ \t\r\n]*:[ \t\r\n]*\Z')
_KEY_WINDOW = 64
_HEX = np.full(256, -1, dtype=np.int16)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
_UNICODE_ESCAPE = re.compile(rb"\\u00[0-9a-fA-F]{2}")


@dataclass
class LongStrings:
    """Placeholders of one request and the bytes they stand for."""

    nonce: str = field(default_factory=lambda: secrets.token_hex(8))
    values: dict[str, memoryview] = field(default_factory=dict)

    def add(self, value: memoryview) -> str:
        """A placeholder string that ``resolve`` turns into ``value``."""
        placeholder = f"\x00oas-long-string:{self.nonce}:{len(self.values)}"
        self.values[placeholder] = value
        return placeholder

    def resolve(self, value: str) -> str | memoryview:
        """The bytes a placeholder stands for; any other string as it is."""
        return self.values.get(value, value)


def _plain_escapes(window: np.ndarray, ahead: np.ndarray) -> np.ndarray:
    """Offsets in ``window`` of the backslashes that start ``\\/`` or ``\\u00XX`` of a
    plain character (some encoders write every "/", "+" or "=" so: PHP, .NET, Gson).
    ``ahead`` is the window and the five bytes after it."""
    starts = np.flatnonzero(window == _BACKSLASH)
    if starts.shape[0] == 0:
        return starts

    def byte(offset: int) -> np.ndarray:
        at = starts + offset
        found = np.zeros(starts.shape[0], dtype=np.uint8)
        inside = at < ahead.shape[0]
        found[inside] = ahead[at[inside]]
        return found

    high, low = _HEX[byte(4)], _HEX[byte(5)]
    code = high * 16 + low
    unicode = (byte(1) == ord("u")) & (byte(2) == ord("0")) & (byte(3) == ord("0"))
    unicode &= (high >= 0) & (low >= 0) & _PLAIN[np.clip(code, 0, 255)]
    return starts[(byte(1) == _SLASH) | unicode]


def plain_runs(data: np.ndarray) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of at least MIN_LENGTH plain bytes, scanned in steps."""
    size = data.shape[0]
    previous_break = -1
    for start in range(0, size, STEP):
        end = min(size, start + STEP)
        window = data[start:end]
        plain = _PLAIN[window]
        # An escape's other bytes are plain already; its backslash is plain if it starts
        # one. Such a backslash is never followed by another, so a run can only start with
        # one right after a break, never after the string's opening quote, if the
        # backslash was itself escaped.
        plain[_plain_escapes(window, data[start : end + 5])] = True
        breaks = np.flatnonzero(~plain) + start
        if breaks.shape[0] == 0:
            continue
        run_starts = np.concatenate(([previous_break], breaks[:-1])) + 1
        for index in np.flatnonzero(breaks - run_starts >= MIN_LENGTH):
            yield int(run_starts[index]), int(breaks[index])
        previous_break = int(breaks[-1])
    # A run reaching the end of the body has no closing quote: not a string.


def value_key(body: memoryview, start: int) -> bytes | None:
    """The key whose whole string value starts at ``start`` (after its quote), if any."""
    if start < 1 or body[start - 1] != _QUOTE:
        return None
    # One byte more than the key pattern may need: the byte before the key's quote.
    window_start = max(0, start - 2 - _KEY_WINDOW)
    before = bytes(body[window_start : start - 1])
    match = _KEY.search(before)
    if match is None or (match.start() == 0 and window_start > 0):
        return None  # not a key, or a key whose quote might be escaped
    return match.group(1)


def backslashes(body: memoryview, start: int, end: int) -> int:
    return sum(
        bytes(body[at : min(end, at + STEP)]).count(b"\\") for at in range(start, end, STEP)
    )


def _unescape(piece: bytes) -> bytes:
    piece = piece.replace(b"\\/", b"/")
    for escape in set(_UNICODE_ESCAPE.findall(piece)):  # a few distinct ones at most
        piece = piece.replace(escape, bytes([int(escape[2:], 16)]))
    return piece


def unescaped(body: memoryview, start: int, end: int) -> memoryview:
    """The run's bytes with its escapes undone, copied in steps into fresh memory. (No
    escape in a run stands for a backslash, so undoing one never makes another.)"""
    out = AnonymousBuffer(end - start)
    at = start
    while at < end:
        stop = min(end, at + STEP)
        tail = bytes(body[max(at, stop - 5) : stop])
        last = tail.rfind(b"\\")
        if stop < end and last != -1:  # never split an escape
            escape_at = stop - len(tail) + last
            stop = min(end, escape_at + (2 if body[escape_at + 1] == _SLASH else 6))
        out.write(_unescape(bytes(body[at:stop])))
        at = stop
    return out.view()


@dataclass
class CutBody:
    """A body whose long audio strings are to be replaced by placeholders."""

    body: memoryview
    cuts: list[tuple[int, int, bytes]]  # (start, end, placeholder) in body order
    long_text_bytes: int  # bytes of text in long text values: a lower bound of the text
    strings: LongStrings

    def kept(self) -> Iterator[memoryview]:
        """The parts of the body that stay (all but the cut strings)."""
        kept_from = 0
        for start, end, _ in self.cuts:
            yield self.body[kept_from:start]
            kept_from = end
        yield self.body[kept_from:]

    @property
    def remainder_size(self) -> int:
        return len(self.body) - sum(end - start - len(ph) for start, end, ph in self.cuts)

    def remainder(self) -> bytes | memoryview:
        """The JSON to decode: build it only once its size is known to be acceptable."""
        if not self.cuts:
            return self.body
        pieces: list[bytes] = []
        kept_from = 0
        for start, end, placeholder in self.cuts:
            pieces += [bytes(self.body[kept_from:start]), placeholder]
            kept_from = end
        pieces.append(bytes(self.body[kept_from:]))
        return b"".join(pieces)


def cut_long_strings(body: memoryview) -> CutBody:
    """Runs in a worker thread; every step that holds the GIL covers at most STEP bytes."""
    strings = LongStrings()
    data = np.frombuffer(body, dtype=np.uint8)
    cuts: list[tuple[int, int, bytes]] = []
    long_text = 0
    for start, end in plain_runs(data):
        if body[end] != _QUOTE:
            continue
        key = value_key(body, start)
        if key is None:
            continue
        escapes = backslashes(body, start, end)
        if key in TEXT_KEYS:
            long_text += end - start - 5 * escapes  # an escape is 6 bytes at most
            continue
        value = unescaped(body, start, end) if escapes else body[start:end]
        placeholder = strings.add(value)
        cuts.append((start, end, b"\\u0000" + placeholder[1:].encode("ascii")))  # as JSON
    return CutBody(body, cuts, long_text, strings)

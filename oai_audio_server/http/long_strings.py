"""Long strings taken out of a JSON request body before it is decoded.

Decoding a 45 MiB body is one call that holds the GIL, and with it the event loop, for
tens of milliseconds; so is building the Python string of its base64 audio. A request's
long strings are its audio (``input_audio.data``, ``audio_url.url``) and, in an attack or
by mistake, its text. A vectorised scan, a MiB at a time, finds every run of at least
``MIN_LENGTH`` plain bytes (printable ASCII but ``"`` and ``\\``, plus the escape ``\\/``)
that is the whole value of a ``"data"``, ``"url"``, ``"text"`` or ``"content"`` key:

* audio values (``data``, ``url``) are replaced by a placeholder and kept as bytes,
  which the audio decoder reads in steps;
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

import mmap
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

MIN_LENGTH = 64 * 1024  # shorter strings cost well under a millisecond to decode
STEP = 1024 * 1024  # bytes per step of any scan or copy that holds the GIL
AUDIO_KEYS = (b"data", b"url")
TEXT_KEYS = (b"text", b"content")
_QUOTE, _BACKSLASH, _SLASH = ord('"'), ord("\\"), ord("/")
_PLAIN = np.zeros(256, dtype=bool)
_PLAIN[0x20:0x7F] = True
_PLAIN[[_QUOTE, _BACKSLASH]] = False
# The key before a value's opening quote; the key's own opening quote must not be escaped.
_KEY = re.compile(rb'(?<!\\)"(data|url|text|content)"[ \t\r\n]*:[ \t\r\n]*\Z')
_KEY_WINDOW = 64


@dataclass
class LongStrings:
    """Placeholders of one request and the bytes they stand for."""

    nonce: str = field(default_factory=lambda: secrets.token_hex(8))
    values: dict[str, memoryview] = field(default_factory=dict)

    def add(self, value: memoryview) -> bytes:
        placeholder = f"\x00oas-long-string:{self.nonce}:{len(self.values)}"
        self.values[placeholder] = value
        return b"\\u0000" + placeholder[1:].encode("ascii")

    def resolve(self, value: str) -> str | memoryview:
        """The bytes a placeholder stands for; any other string as it is."""
        return self.values.get(value, value)


def plain_runs(data: np.ndarray) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of at least MIN_LENGTH plain bytes, scanned in steps."""
    size = data.shape[0]
    previous_break = -1
    for start in range(0, size, STEP):
        end = min(size, start + STEP)
        window = data[start:end]
        plain = _PLAIN[window]
        following = data[start + 1 : end + 1]  # one byte ahead: is a backslash "\/"?
        plain[: following.shape[0]] |= (window[: following.shape[0]] == _BACKSLASH) & (
            following == _SLASH
        )
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
    before = bytes(body[max(0, start - 1 - _KEY_WINDOW) : start - 1])
    match = _KEY.search(before)
    return match.group(1) if match else None


def backslashes(body: memoryview, start: int, end: int) -> int:
    return sum(
        bytes(body[at : min(end, at + STEP)]).count(b"\\") for at in range(start, end, STEP)
    )


def unescaped(body: memoryview, start: int, end: int) -> memoryview:
    """The run's bytes with every ``\\/`` made ``/``, copied in steps into fresh memory."""
    out = mmap.mmap(-1, end - start)
    written = 0
    at = start
    while at < end:
        stop = min(end, at + STEP)
        if stop < end and body[stop - 1] == _BACKSLASH:
            stop += 1  # never split an escape
        piece = bytes(body[at:stop]).replace(b"\\/", b"/")
        out[written : written + len(piece)] = piece
        written += len(piece)
        at = stop
    return memoryview(out)[:written]


@dataclass
class CutBody:
    """A body whose long audio strings are to be replaced by placeholders."""

    body: memoryview
    cuts: list[tuple[int, int, bytes]]  # (start, end, placeholder) in body order
    long_text_bytes: int  # bytes of text in long text values: a lower bound of the text
    strings: LongStrings

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
            long_text += end - start - escapes
            continue
        value = unescaped(body, start, end) if escapes else body[start:end]
        cuts.append((start, end, strings.add(value)))
    return CutBody(body, cuts, long_text, strings)

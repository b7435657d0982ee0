"""Audio carried in the request itself: base64 strings and ``data:`` URIs, decoded to bytes.

A payload is a ``str`` (from the decoded JSON) or a ``memoryview`` of ASCII bytes (a long
string the body reader cut out of the JSON, see ``http.long_strings``). Either way it is
decoded in steps of ``STEP_CHARS`` into fresh anonymous memory, so that no single C call
holds the GIL, and with it the event loop, for the whole payload: the callers run this
in a worker thread, but a thread that holds the GIL stops the loop all the same.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from oai_audio_server.errors import InvalidAudioError, InvalidRequestError
from oai_audio_server.memory import AnonymousBuffer
from oai_audio_server.settings import limit_name
from oai_audio_server.units import format_value

Payload = str | memoryview
AudioBytes = bytes | memoryview

# A multiple of 4, so that base64 steps stay aligned.
STEP_CHARS = 1024 * 1024
_DATA_MEDIA_TYPES = ("application/octet-stream", "application/ogg")
_DATA_MEDIA_PREFIXES = ("audio/", "video/")
_WHITESPACE = b" \t\n\r\x0b\x0c"
_HEADER_CHARS = 1024  # a data: URI's header (media type and parameters) is shorter


def too_large(size: int | None, max_bytes: int, *, about: bool = False) -> InvalidAudioError:
    """``size`` None: the audio was cut off at the limit, its whole size unknown."""
    over = "over" if size is None else f"{'about ' if about else ''}{size} bytes, over"
    return InvalidAudioError(
        f"The audio is {over} this server's limit of {format_value(max_bytes, 'bytes')} "
        f"per file ({limit_name('max_audio_bytes')}). Send a smaller or more compressed "
        "file (mp3, ogg or a lower sample rate), or a shorter part of it.",
        code="audio_too_large",
    )


def head(payload: Payload, chars: int) -> str:
    """The payload's first characters, as text (enough to tell a data: URI)."""
    start = payload[:chars]
    return start if isinstance(start, str) else bytes(start).decode("ascii", "replace")


def _piece(payload: Payload, start: int, end: int) -> bytes:
    piece = payload[start:end]
    if isinstance(piece, str):  # invalid text must fail as invalid data, not crash
        return piece.encode("utf-8", "surrogatepass")
    return bytes(piece)


def _invalid_base64() -> InvalidRequestError:
    return InvalidRequestError(
        "The audio data is not valid base64. Send the file's bytes base64-encoded "
        "(standard alphabet), without a data: prefix or with a complete data: URI.",
        code="invalid_base64",
    )


def decode_base64_audio(data: Payload, max_bytes: int) -> AudioBytes:
    """Standard base64 (whitespace and missing padding tolerated), capped in size."""
    if len(data) > STEP_CHARS * 2 and (len(data) // 4) * 3 > 2 * max_bytes + 2:
        # Whitespace could not make up the difference in any real client's encoding.
        raise too_large(len(data) * 3 // 4, max_bytes, about=True)
    output = AnonymousBuffer(len(data) * 3 // 4 + 3)
    carry = b""
    padded = False
    for start in range(0, len(data), STEP_CHARS):
        if isinstance(data, str):  # any Unicode whitespace, as str.split() sees it
            piece = "".join(data[start : start + STEP_CHARS].split())
            raw = piece.encode("utf-8", "surrogatepass")
        else:
            raw = _piece(data, start, start + STEP_CHARS).translate(None, _WHITESPACE)
        compact = carry + raw
        whole = len(compact) - len(compact) % 4
        carry = compact[whole:]
        if not whole:
            continue
        if padded:  # padding ends the data; more came after it
            raise _invalid_base64()
        output.write(_b64decode(compact[:whole]))
        padded = compact[whole - 1] == ord("=")
        if output.size > max_bytes + 2:
            raise too_large(None, max_bytes)
    if carry:
        if padded:
            raise _invalid_base64()
        output.write(_b64decode(carry + b"=" * (-len(carry) % 4)))
    if output.size == 0 and not carry:
        raise InvalidRequestError("The base64 audio data is empty.", code="invalid_base64")
    if output.size > max_bytes:
        raise too_large(output.size, max_bytes)
    return output.view()


def _b64decode(aligned: bytes) -> bytes:
    try:
        return base64.b64decode(aligned, validate=True)
    except (binascii.Error, ValueError) as error:
        raise _invalid_base64() from error


_HEX_VALUES = np.full(256, -1, dtype=np.int16)
for _digit in b"0123456789":
    _HEX_VALUES[_digit] = _digit - ord("0")
for _offset, _letter in enumerate(b"abcdef"):
    _HEX_VALUES[_letter] = _HEX_VALUES[_letter - 32] = 10 + _offset


def percent_decode(raw: bytes) -> bytes:
    """``urllib.parse.unquote_to_bytes`` (malformed escapes kept as they are), in array
    operations: that one loops in Python over every escape, seconds for megabytes."""
    if b"%" not in raw:
        return raw
    data = np.frombuffer(raw, dtype=np.uint8)
    marks = np.flatnonzero(data == ord("%"))
    marks = marks[marks + 2 < len(data)]
    high, low = _HEX_VALUES[data[marks + 1]], _HEX_VALUES[data[marks + 2]]
    valid = (high >= 0) & (low >= 0)  # a valid escape's digits are never a "%"
    marks = marks[valid]
    decoded = data.copy()
    decoded[marks] = (high[valid] * 16 + low[valid]).astype(np.uint8)
    keep = np.ones(len(data), dtype=bool)
    keep[marks + 1] = False
    keep[marks + 2] = False
    return bytes(decoded[keep].tobytes())


def _unquote_in_steps(payload: Payload, max_bytes: int) -> AudioBytes:
    """Percent-decoding in steps that never split an escape."""
    output = AnonymousBuffer(min(len(payload) * 4, max_bytes + 1))  # UTF-8: 4 bytes a char at most
    start = 0
    while start < len(payload):
        raw = _piece(payload, start, start + STEP_CHARS)
        taken = STEP_CHARS
        if start + STEP_CHARS < len(payload):
            cut = raw.rfind(b"%", max(0, len(raw) - 2))
            if cut > 0 and isinstance(payload, memoryview):
                taken, raw = cut, raw[:cut]  # an escape starts in the last two bytes
            elif cut > 0:
                taken = len(raw[:cut].decode("utf-8"))  # keep the escape whole
                raw = raw[:cut]
        decoded = percent_decode(raw)
        if output.size + len(decoded) > max_bytes:
            raise too_large(None, max_bytes)
        output.write(decoded)
        start += taken
    return output.view()


def strip_payload(payload: Payload) -> Payload:
    """Without leading and trailing whitespace; a view is trimmed a step at a time."""
    if isinstance(payload, str):
        return payload.strip()
    start, end = 0, len(payload)
    while start < end:
        chunk = bytes(payload[start : min(end, start + STEP_CHARS)])
        kept = chunk.lstrip(_WHITESPACE)
        start += len(chunk) - len(kept)
        if kept:
            break
    while end > start:
        chunk = bytes(payload[max(start, end - STEP_CHARS) : end])
        kept = chunk.rstrip(_WHITESPACE)
        end -= len(chunk) - len(kept)
        if kept:
            break
    return payload[start:end]


def decode_data_uri(url: Payload, max_bytes: int) -> AudioBytes:
    """Bytes of ``data:[<media type>][;params];base64,<data>`` (or percent-encoded)."""
    url = strip_payload(url)
    header, comma, _ = head(url, _HEADER_CHARS).partition(",")
    if not comma or not header.lower().startswith("data:"):
        raise InvalidRequestError(
            "The data: URI is malformed; expected data:audio/<type>;base64,<data>.",
            code="invalid_data_uri",
        )
    payload = url[len(header) + 1 :]
    params = [part.strip().lower() for part in header[len("data:") :].split(";")]
    media_type, flags = params[0], params[1:]
    if media_type and not (
        media_type in _DATA_MEDIA_TYPES or media_type.startswith(_DATA_MEDIA_PREFIXES)
    ):
        raise InvalidRequestError(
            f"The data: URI has media type {media_type!r}; use audio/* (for example "
            "audio/wav) or application/octet-stream.",
            code="invalid_data_uri",
        )
    if "base64" in flags:
        return decode_base64_audio(payload, max_bytes)
    if len(payload) > 3 * max_bytes:
        raise too_large(None, max_bytes)
    return _unquote_in_steps(payload, max_bytes)

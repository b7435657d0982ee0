"""Reading request bodies without holding the event loop.

* JSON routes want a JSON media type (415 otherwise). Besides telling a client what to
  fix, this keeps web pages out: text/plain, form and type-less bodies are "simple"
  cross-origin requests that a browser sends without asking the server first.
* Work in proportion to the body runs on the runtime's bounded body pool once the body
  is large, in steps of a MiB or so: the GIL, and with it the event loop, is never held
  for long. Long audio strings are cut out of the JSON before it is decoded
  (``long_strings``) and reach the audio decoder as bytes; what is left is capped
  (MAX_JSON_BESIDES_AUDIO bytes, MAX_JSON_CONTAINERS objects and arrays), so that the
  one decoding call stays short.
* A body over the cap whose text alone could never fit the model's window gets
  ``context_length_exceeded`` rather than 413: only text holds non-ASCII bytes or JSON
  escapes, so they bound its size from below at the cost of a byte scan. Under the cap
  the prompt builder decides (old history turns that cannot fit are dropped, not
  refused).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
import numpy as np
from litestar import Request

from oai_audio_server.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from oai_audio_server.http.buffers import INLINE_BYTES, assemble
from oai_audio_server.http.errors import decode_body
from oai_audio_server.http.long_strings import LongStrings, cut_long_strings
from oai_audio_server.runtime import Runtime
from oai_audio_server.settings import MIB

T = TypeVar("T")

_SCAN_CHUNK = 1024 * 1024  # bounds each step that holds the GIL
_ASCII = bytes(range(128))
# JSON besides long audio strings: requests, history and tool lists of any real client fit
# many times over, and decoding it (one call that holds the GIL) stays within ~30 ms on
# the 2-core test machine even when it is all small objects.
MAX_JSON_BESIDES_AUDIO = 4 * MIB
MAX_JSON_CONTAINERS = 100_000  # ~20 ms of decoding, object creation and collection
_OFFSET = re.compile(r" ?\(?at byte \d+\)?| ?\(byte \d+\)")


def media_type(request: Request[Any, Any, Any]) -> str:
    raw = request.headers.get("content-type") or ""
    return raw.split(";", 1)[0].strip().lower()


def is_json_media_type(kind: str) -> bool:
    if kind == "application/json":
        return True
    return kind.startswith("application/") and kind.endswith("+json")


def require_json(request: Request[Any, Any, Any]) -> None:
    kind = media_type(request)
    if not is_json_media_type(kind):
        raise UnsupportedMediaTypeError(
            f"this endpoint reads JSON, but the request's Content-Type is "
            f"{kind or 'missing'}; send the body with 'Content-Type: application/json'",
        )


def least_text_bytes(body: bytes | memoryview) -> int:
    """A lower bound on the UTF-8 bytes of text in a JSON body: its non-ASCII bytes,
    plus one for every two backslashes (an escape is one character or more; a
    surrogate pair takes two), not counting ``\\/``: base64 audio from some encoders
    (PHP's json_encode) has one in every few characters, and it is audio, not text."""
    non_ascii = backslashes = 0
    for start in range(0, len(body), _SCAN_CHUNK):
        chunk = bytes(body[start : start + _SCAN_CHUNK + 1])  # one more: a split "\\/"
        if not chunk.isascii():
            non_ascii += len(chunk[:_SCAN_CHUNK].translate(None, _ASCII))
        backslashes += chunk[:_SCAN_CHUNK].count(b"\\") - chunk.count(b"\\/")
    return non_ascii + max(0, backslashes) // 2


@dataclass(frozen=True)
class BodyLimits:
    max_text_bytes: int
    window: int


@dataclass(frozen=True)
class DecodedBody(Generic[T]):
    value: T
    long_strings: LongStrings


def decode_in_steps(
    chunks: list[bytes], decoder: msgspec.json.Decoder[T], limits: BodyLimits
) -> DecodedBody[T]:
    """Check and decode a body. No step holds the GIL for more than a MiB's work, but
    the final decode of what is left once audio strings are cut out, which the caps
    bound (MAX_JSON_BESIDES_AUDIO bytes, MAX_JSON_CONTAINERS objects and arrays)."""
    body = assemble(chunks)
    if isinstance(body, bytes):  # small: one quick call
        refuse_many_containers(body)
        return DecodedBody(decode_body(body, decoder), LongStrings())
    cut = cut_long_strings(body)
    if cut.remainder_size > MAX_JSON_BESIDES_AUDIO:
        text = sum(least_text_bytes(part) for part in cut.kept()) + cut.long_text_bytes
        if text > limits.max_text_bytes:
            raise ContextLengthExceededError(
                f"the request holds at least {text} bytes of text, more than the model's "
                f"{limits.window}-token window can hold (at most {limits.max_text_bytes} "
                "bytes of text); send shorter text",
                param="messages",
            )
        raise PayloadTooLargeError(
            f"the request has {cut.remainder_size} bytes of JSON besides its long audio "
            f"strings (text, history, tools, other fields, and audio strings with JSON "
            f"escapes other than \\/ or \\u00XX); this server accepts at most "
            f"{MAX_JSON_BESIDES_AUDIO // MIB} MiB of that; send less"
        )
    remainder = cut.remainder()
    refuse_many_containers(remainder)
    try:
        return DecodedBody(decode_body(remainder, decoder), cut.strings)
    except InvalidRequestError as error:
        if cut.cuts:  # a byte offset would count in the shortened body, not the one sent
            error.message = _OFFSET.sub("", error.message)
        raise


def refuse_many_containers(json: bytes | memoryview) -> None:
    """Decoding builds a Python object for every JSON object and array; the count of
    "[" and "{" bytes bounds theirs from above, in one vectorised pass."""
    data = np.frombuffer(json, dtype=np.uint8)
    count = int(np.count_nonzero(data == ord("["))) + int(np.count_nonzero(data == ord("{")))
    if count > MAX_JSON_CONTAINERS:
        raise PayloadTooLargeError(
            f"the request holds up to {count} JSON objects and arrays; this server "
            f"accepts at most {MAX_JSON_CONTAINERS} (a chat of --max-messages messages "
            "with tools needs far fewer)"
        )


async def read_chunks(request: Request[Any, Any, Any]) -> list[bytes]:
    return [chunk async for chunk in request.stream() if chunk]


async def read_json(
    runtime: Runtime, request: Request[Any, Any, Any], decoder: msgspec.json.Decoder[T]
) -> DecodedBody[T]:
    """The decoded JSON body, after the media type and the text volume are checked."""
    require_json(request)
    chunks = await read_chunks(request)
    bundle = runtime.bundle  # a 503 before decoding, when no model could answer anyway
    window = bundle.max_window_size
    per_token = runtime.prompt_builder.max_token_bytes
    size = sum(len(chunk) for chunk in chunks)
    max_text_bytes = window * per_token if per_token > 0 else size  # 0: no bound
    limits = BodyLimits(max_text_bytes, window)
    if size <= INLINE_BYTES:
        return decode_in_steps(chunks, decoder, limits)
    return await runtime.offload(decode_in_steps, chunks, decoder, limits)

"""Reading request bodies without holding the event loop.

* JSON routes want a JSON media type (415 otherwise). Besides telling a client what to
  fix, this keeps web pages out: text/plain, form and type-less bodies are "simple"
  cross-origin requests that a browser sends without asking the server first.
* Text that could never fit the model's window is refused from the raw bytes, before
  any decoding: only text holds non-ASCII bytes or JSON escapes (base64 audio has
  neither), so they bound the text's size from below at the cost of a byte scan.
* Work in proportion to the body (that scan, JSON decoding) runs on the runtime's
  bounded body pool once the body is large.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request

from oai_audio_server.errors import ContextLengthExceededError, UnsupportedMediaTypeError
from oai_audio_server.http.errors import decode_body
from oai_audio_server.runtime import Runtime

# Below this, scanning and decoding take well under a millisecond: not worth a thread.
INLINE_BYTES = 256 * 1024
_SCAN_CHUNK = 1024 * 1024  # bounds each step that holds the GIL
_ASCII = bytes(range(128))


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


def least_text_bytes(body: bytes) -> int:
    """A lower bound on the UTF-8 bytes of text in a JSON body: its non-ASCII bytes,
    plus one for every two backslashes (an escape is one character or more; a
    surrogate pair takes two)."""
    non_ascii = backslashes = 0
    for start in range(0, len(body), _SCAN_CHUNK):
        chunk = body[start : start + _SCAN_CHUNK]
        if not chunk.isascii():
            non_ascii += len(chunk.translate(None, _ASCII))
        backslashes += chunk.count(b"\\")
    return non_ascii + backslashes // 2


def check_text_volume(body: bytes, max_text_bytes: int, window: int) -> None:
    least = least_text_bytes(body)
    if least > max_text_bytes:
        raise ContextLengthExceededError(
            f"the request holds at least {least} bytes of text, more than the model's "
            f"{window}-token window can hold (at most {max_text_bytes} bytes of text); "
            "send shorter text",
            param="messages",
        )


def _scan_and_decode(
    body: bytes, decoder: msgspec.json.Decoder[Any], max_text_bytes: int, window: int
) -> Any:
    check_text_volume(body, max_text_bytes, window)
    return decode_body(body, decoder)


async def read_json(
    runtime: Runtime, request: Request[Any, Any, Any], decoder: msgspec.json.Decoder[Any]
) -> Any:
    """The decoded JSON body, after the media type and the text volume are checked."""
    require_json(request)
    body = await request.body()
    bundle = runtime.bundle  # a 503 before decoding, when no model could answer anyway
    window = bundle.max_window_size
    per_token = runtime.prompt_builder.max_token_bytes
    max_text_bytes = window * per_token if per_token > 0 else len(body)  # 0: no bound
    if len(body) <= INLINE_BYTES:
        return _scan_and_decode(body, decoder, max_text_bytes, window)
    return await runtime.offload(_scan_and_decode, body, decoder, max_text_bytes, window)

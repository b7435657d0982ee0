"""An OpenAI error body sent straight through ASGI, for the wrappers that answer
before Litestar's own stack (and its exception handlers) sees the request."""

from __future__ import annotations

import msgspec
from litestar.types import Send

from oai_audio_server.errors import APIError


async def send_error(send: Send, error: APIError, *, close: bool = False) -> None:
    body = msgspec.json.encode(error.to_body())
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode("latin-1"), value.encode("latin-1"))
          for name, value in error.headers.items()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})

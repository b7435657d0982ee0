"""Server-sent events framing shared by every streaming endpoint."""

from __future__ import annotations

KEEPALIVE_SECONDS = 15.0
KEEPALIVE = b": keep-alive\n\n"


def sse_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"

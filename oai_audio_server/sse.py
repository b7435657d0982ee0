"""Server-sent events shared by every streaming endpoint: framing, keep-alives, and
reading a generation's events as they arrive."""

from __future__ import annotations

import asyncio

from oai_audio_server.engine.types import GenerationEvent, GenerationHandle, coalesce

KEEPALIVE_SECONDS = 15.0
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"


def sse_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


async def next_events(handle: GenerationHandle) -> list[GenerationEvent] | None:
    """The events delivered so far, adjacent text joined (a client that fell behind gets
    one larger chunk); None after a quiet keep-alive period. How often text arrives is
    the engine's pacing (GenerationRequest.text_interval)."""
    # asyncio.wait, not wait_for: no timeout exception to catch, whose class differs
    # before Python 3.11 (asyncio.TimeoutError is the builtin TimeoutError only from 3.11).
    waiting = asyncio.ensure_future(handle.next_event())
    try:
        done, _ = await asyncio.wait({waiting}, timeout=KEEPALIVE_SECONDS)
    finally:
        if not waiting.done():
            waiting.cancel()  # a quiet period, or our caller was cancelled
    if not done:
        return None
    return coalesce([waiting.result(), *handle.ready_events()])

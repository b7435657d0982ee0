"""Server-sent events shared by every streaming endpoint: framing, keep-alives, and
reading a generation's events as they arrive."""

from __future__ import annotations

import asyncio

from oai_audio_server.engine.types import GenerationEvent, GenerationHandle, coalesce

KEEPALIVE_SECONDS = 15.0
KEEPALIVE = b": keep-alive\n\n"


def sse_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


async def next_events(handle: GenerationHandle) -> list[GenerationEvent] | None:
    """The events delivered so far, adjacent text joined (a client that fell behind gets
    one larger chunk); None after a quiet keep-alive period. How often text arrives is
    the engine's pacing (GenerationRequest.text_interval)."""
    try:
        arrived = await asyncio.wait_for(handle.next_event(), KEEPALIVE_SECONDS)
    except TimeoutError:
        return None
    return coalesce([arrived, *handle.ready_events()])

"""Server-sent events shared by every streaming endpoint: framing, keep-alives, and
reading a generation's events in chunk-sized groups."""

from __future__ import annotations

import asyncio

from oai_audio_server.engine.types import (
    Failed,
    Finished,
    GenerationEvent,
    GenerationHandle,
    coalesce,
)

KEEPALIVE_SECONDS = 15.0
KEEPALIVE = b": keep-alive\n\n"


def sse_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


async def next_events(handle: GenerationHandle, *, hold: float) -> list[GenerationEvent] | None:
    """The next events of a stream, adjacent text joined; None after a quiet keep-alive
    period. With ``hold`` > 0, text is gathered for up to that many seconds (a final
    event ends the wait at once): a fast model then costs one chunk per interval rather
    than one encode, write and client parse per token."""
    try:
        arrived = await asyncio.wait_for(handle.next_event(), KEEPALIVE_SECONDS)
    except TimeoutError:
        return None
    events = [arrived, *handle.ready_events()]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + hold
    while hold > 0 and not any(isinstance(e, Finished | Failed) for e in events):
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            events.append(await asyncio.wait_for(handle.next_event(), remaining))
        except TimeoutError:
            break
        events += handle.ready_events()
    return coalesce(events)

"""Server-sent events shared by every streaming endpoint: framing, keep-alives, and
reading a generation's events as they arrive."""

from __future__ import annotations

import asyncio
from collections.abc import Container, Sequence

from oai_audio_server.engine.types import (
    Failed,
    Finished,
    GenerationEvent,
    GenerationHandle,
    coalesce,
)

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


async def next_choice_events(
    handles: Sequence[GenerationHandle], finished: Container[int]
) -> list[tuple[int, GenerationEvent]] | None:
    """``next_events`` over the choices of one request (``n``): the events delivered so
    far as (choice index, event), each choice's in order; ``finished`` choices are not
    waited on. None after a quiet keep-alive period."""
    active = [i for i in range(len(handles)) if i not in finished]
    if len(active) == 1:
        events = await next_events(handles[active[0]])
        return None if events is None else [(active[0], e) for e in events]
    waits = {asyncio.ensure_future(handles[i].next_event()): i for i in active}
    try:
        done, _ = await asyncio.wait(
            waits, timeout=KEEPALIVE_SECONDS, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for waiting in waits:
            if not waiting.done():
                waiting.cancel()  # a queue's get() gives up without taking an item
    if not done:
        return None
    out: list[tuple[int, GenerationEvent]] = []
    for waiting, index in waits.items():
        got = [waiting.result()] if waiting in done else []
        ended = any(isinstance(e, Finished | Failed) for e in got)
        more = [] if ended else handles[index].ready_events()
        out.extend((index, event) for event in coalesce(got + more))
    return out

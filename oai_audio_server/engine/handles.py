"""Request handles and where their events go.

A handle is one queued or running request as the service layer sees it: its events as an
async stream, and ``cancel()``. The engine's worker thread delivers a whole step's events
to each sink in one call (``Outbox``), so an event loop is woken once per step rather than
once per token of every row.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from oai_audio_server.engine.types import Failed, Finished, GenerationEvent, GenerationRequest


class EventSink(Protocol):
    """Where a handle's events go: one call per worker step with all of them."""

    def deliver(self, items: list[tuple[RequestHandle, GenerationEvent]]) -> None: ...


@dataclass(frozen=True)
class LoopSink:
    """Events for handles read on an asyncio event loop. One wake-up of the loop per
    step rather than one per token of every row: each wake-up is a write to the loop's
    self-pipe, and a loop woken per token competes with the worker for the CPU and the
    GIL."""

    loop: asyncio.AbstractEventLoop

    def deliver(self, items: list[tuple[RequestHandle, GenerationEvent]]) -> None:
        try:
            self.loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            for handle, _ in items:
                handle.cancelled = True


def _put_all(items: list[tuple[RequestHandle, GenerationEvent]]) -> None:
    for handle, event in items:
        handle.put(event)


class RequestHandle:
    """One queued or running request: its events as an async stream, and cancel()."""

    def __init__(self, request: GenerationRequest, sink: EventSink) -> None:
        self.request = request
        self.sink = sink
        self._queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self.cancelled = False
        self.queued_at_step = 0  # the engine's decode step count when it was queued
        self.queued_at = time.monotonic()
        self.admitted_at: float | None = None  # when it left the queue for the batch
        # The first choice of the same prompt (``n`` > 1), whose prefill this one shares.
        self.leader: RequestHandle | None = None

    def emit(self, event: GenerationEvent) -> None:
        """Deliver one event at once (from outside the worker's step)."""
        self.sink.deliver([(self, event)])

    def cancel(self) -> None:
        self.cancelled = True

    async def next_event(self) -> GenerationEvent:
        return await self._queue.get()

    def ready_events(self) -> list[GenerationEvent]:
        """Events already delivered, without waiting (for coalescing a stream's chunks)."""
        events: list[GenerationEvent] = []
        while not self._queue.empty():
            events.append(self._queue.get_nowait())
        return events

    async def events(self) -> AsyncIterator[GenerationEvent]:
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, Finished | Failed):
                return

    def put(self, event: GenerationEvent) -> None:
        """Called on the event loop that reads the handle."""
        self._queue.put_nowait(event)


class Outbox:
    """The events of one worker step, handed to each sink in a single call."""

    def __init__(self) -> None:
        self._items: list[tuple[RequestHandle, GenerationEvent]] = []

    def add(self, handle: RequestHandle, event: GenerationEvent) -> None:
        self._items.append((handle, event))

    def flush(self) -> None:
        items, self._items = self._items, []
        by_sink: dict[EventSink, list[tuple[RequestHandle, GenerationEvent]]] = {}
        for handle, event in items:
            by_sink.setdefault(handle.sink, []).append((handle, event))
        for sink, events in by_sink.items():
            sink.deliver(events)


def group_choices(
    handles: Sequence[RequestHandle], limit: int,
    fits: Callable[[RequestHandle, int], bool] = lambda leader, size: True,
) -> list[list[RequestHandle]]:
    """Queued handles in admission units: a request and the following choices of its
    prompt (at most ``limit`` together, and only as many as ``fits(leader, size)``
    allows; a choice whose first choice is no longer just before it, or that does not
    fit with it, is a unit of its own and prefills its prompt itself)."""
    units: list[list[RequestHandle]] = []
    for handle in handles:
        unit = units[-1] if units else None
        if (unit is not None and handle.leader is unit[0] and len(unit) < limit
                and fits(unit[0], len(unit) + 1)):
            unit.append(handle)
        else:
            units.append([handle])
    return units

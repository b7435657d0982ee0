"""Stream chunking: text gathered for a short interval, final events never held back."""

from __future__ import annotations

import asyncio
import time

from oai_audio_server.engine.types import Finished, GenerationEvent, TextDelta
from oai_audio_server.sse import next_events


class FakeHandle:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()

    async def next_event(self) -> GenerationEvent:
        return await self.queue.get()

    def ready_events(self) -> list[GenerationEvent]:
        events = []
        while not self.queue.empty():
            events.append(self.queue.get_nowait())
        return events


async def feed(handle: FakeHandle, events: list[GenerationEvent], gap: float) -> None:
    for event in events:
        handle.queue.put_nowait(event)
        await asyncio.sleep(gap)


def test_without_hold_each_arrival_is_its_own_chunk() -> None:
    async def scenario() -> list[GenerationEvent] | None:
        handle = FakeHandle()
        task = asyncio.create_task(feed(handle, [TextDelta("a"), TextDelta("b")], 0.02))
        got = await next_events(handle, hold=0.0)  # type: ignore[arg-type]
        await task
        return got

    assert asyncio.run(scenario()) == [TextDelta("a")]


def gathered(gap: float, hold: float) -> list[GenerationEvent] | None:
    async def scenario() -> list[GenerationEvent] | None:
        handle = FakeHandle()
        task = asyncio.create_task(feed(handle, [TextDelta(c) for c in "abcdef"], gap))
        got = await next_events(handle, hold=hold)  # type: ignore[arg-type]
        task.cancel()
        return got

    return asyncio.run(scenario())


def test_hold_gathers_the_text_that_arrives_within_it() -> None:
    assert gathered(gap=0.001, hold=0.5) == [TextDelta("abcdef")]


def test_text_after_the_hold_waits_for_the_next_chunk() -> None:
    assert gathered(gap=0.2, hold=0.01) == [TextDelta("a")]


def test_a_final_event_is_not_held_back() -> None:
    end = Finished("stop", 1, 2)

    async def scenario() -> tuple[list[GenerationEvent] | None, float]:
        handle = FakeHandle()
        task = asyncio.create_task(feed(handle, [TextDelta("a"), end], 0.001))
        started = time.perf_counter()
        got = await next_events(handle, hold=5.0)  # type: ignore[arg-type]
        await task
        return got, time.perf_counter() - started

    got, waited = asyncio.run(scenario())
    assert got == [TextDelta("a"), end]
    assert waited < 5.0  # it returned on the final event, not at the end of the hold

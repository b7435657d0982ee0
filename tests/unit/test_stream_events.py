"""Stream chunking: the engine's text pacing, and reading what has been delivered."""

from __future__ import annotations

import asyncio
import math

import pytest

from oai_audio_server.engine.pacing import TextPacer
from oai_audio_server.engine.types import Finished, GenerationEvent, TextDelta
from oai_audio_server.sse import next_events


def test_the_first_text_goes_out_at_once() -> None:
    pacer = TextPacer(10.0)
    assert pacer.push("a", now=100.0) == "a"


def test_text_within_the_interval_is_held_then_released_together() -> None:
    pacer = TextPacer(0.010)
    assert pacer.push("a", now=1.000) == "a"
    assert pacer.push("b", now=1.004) == ""
    assert pacer.push("c", now=1.008) == ""
    assert pacer.push("d", now=1.011) == "bcd"
    assert pacer.push("e", now=1.012) == ""
    assert pacer.drain() == "e"
    assert pacer.drain() == ""


def test_zero_interval_releases_every_piece() -> None:
    pacer = TextPacer(0.0)
    assert [pacer.push(c, now=5.0) for c in "abc"] == ["a", "b", "c"]


def test_infinite_interval_keeps_everything_after_the_first_for_the_end() -> None:
    pacer = TextPacer(math.inf)
    assert pacer.push("first", now=0.0) == "first"
    assert [pacer.push(c, now=1e9) for c in "xyz"] == ["", "", ""]
    assert pacer.drain() == "xyz"


def test_empty_text_does_not_count_as_the_first_delivery() -> None:
    pacer = TextPacer(10.0)
    assert pacer.push("", now=0.0) == ""
    assert pacer.push("a", now=1.0) == "a"


@pytest.mark.parametrize("interval", [-1.0, math.nan])
def test_bad_intervals_are_refused(interval: float) -> None:
    with pytest.raises(ValueError):
        TextPacer(interval)


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


def test_delivered_events_are_read_together_with_text_joined() -> None:
    end = Finished("stop", 1, 2)

    async def scenario() -> list[GenerationEvent] | None:
        handle = FakeHandle()
        for event in (TextDelta("a"), TextDelta("b"), end):
            handle.queue.put_nowait(event)
        return await next_events(handle)  # type: ignore[arg-type]

    assert asyncio.run(scenario()) == [TextDelta("ab"), end]


def test_reading_returns_on_the_first_arrival() -> None:
    async def scenario() -> list[GenerationEvent] | None:
        handle = FakeHandle()

        async def later() -> None:
            handle.queue.put_nowait(TextDelta("a"))
            await asyncio.sleep(0.05)
            handle.queue.put_nowait(TextDelta("b"))

        task = asyncio.create_task(later())
        got = await next_events(handle)  # type: ignore[arg-type]
        await task
        return got

    assert asyncio.run(scenario()) == [TextDelta("a")]


def test_held_text_is_released_once_due_even_when_no_new_text_arrives() -> None:
    pacer = TextPacer(0.010)
    assert pacer.push("a", now=1.000) == "a"
    assert pacer.push("b", now=1.002) == ""
    assert pacer.push("", now=1.005) == ""  # not due yet
    assert pacer.push("", now=1.011) == "b"  # a step that decoded no printable text
    assert pacer.push("", now=1.030) == ""  # nothing held

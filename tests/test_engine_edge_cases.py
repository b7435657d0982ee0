"""Edge cases of the engine loop found by review: faults while n choices join, a fault
while an overlapped step is read, a request whose keys cannot be made, and choices that
could never fit the cache together. Each must end every request with an event, give
every block back and leave the other requests' answers unchanged."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from media import tone, wav_bytes

from oai_audio_server.audio.decode import decode_audio
from oai_audio_server.engine.cache_plan import CacheOptions
from oai_audio_server.engine.core import BatchingEngine
from oai_audio_server.engine.handles import RequestHandle
from oai_audio_server.engine.loader import ModelBundle, load_bundle
from oai_audio_server.engine.sampling import SampledStep, choice_seed
from oai_audio_server.engine.types import (
    Failed,
    Finished,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)
from oai_audio_server.settings import Settings


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint: Path) -> ModelBundle:
    return load_bundle(Settings(model=str(tiny_checkpoint)))


@pytest.fixture()
def engine_of(bundle: ModelBundle) -> Iterator[Any]:
    engines: list[BatchingEngine] = []

    def make(**limits: Any) -> BatchingEngine:
        engine = BatchingEngine(lambda: bundle, **limits)
        engine.start()
        deadline = time.monotonic() + 30
        while not engine.ready:
            assert time.monotonic() < deadline, "engine did not start"
            time.sleep(0.01)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def request(prompt: range | list[int], name: str, max_tokens: int, **sampling: Any
            ) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, **sampling})
    return GenerationRequest(name, list(prompt), [], params)


def choices(first: GenerationRequest, count: int) -> list[GenerationRequest]:
    return [first] + [
        replace(first, request_id=f"{first.request_id}-{i}", same_prompt_as_previous=True,
                sampling=replace(first.sampling, seed=choice_seed(first.sampling.seed or 0, i)))
        for i in range(1, count)
    ]


async def outcome(engine: BatchingEngine, generation: GenerationRequest) -> GenerationEvent:
    return await last_event(engine.submit(generation))


async def last_event(handle: RequestHandle) -> GenerationEvent:
    while True:
        event = await asyncio.wait_for(handle.next_event(), 30)
        if not isinstance(event, TextDelta):
            return event


def all_blocks_back(engine: BatchingEngine) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats["kv_blocks_free"] == stats["kv_blocks_total"] and not stats["batch_size"]:
            return True
        time.sleep(0.01)
    return False


def test_a_fault_while_choices_join_fails_every_choice(engine_of: Any) -> None:
    engine = engine_of(max_batch_size=4)
    sampler = engine._sampler
    original = sampler.add_rows

    def failing(start: int, specs: Any) -> Any:
        if any(spec.params.max_tokens == 13 for spec in specs):
            raise RuntimeError("injected")
        return original(start, specs)

    sampler.add_rows = failing
    first = request(range(100, 140), "n", 13, temperature=1.0, seed=3)

    async def scenario() -> list[GenerationEvent]:
        handles = engine.submit_group(choices(first, 3))
        return list(await asyncio.gather(*(last_event(h) for h in handles)))

    events = asyncio.run(scenario())
    assert all(isinstance(event, Failed) for event in events)
    assert all_blocks_back(engine)
    sampler.add_rows = original
    after = asyncio.run(outcome(engine, request(range(100, 120), "after", 4)))
    assert isinstance(after, Finished)


def test_a_fault_reading_an_overlapped_step_leaves_the_other_rows_unchanged(
    engine_of: Any,
) -> None:
    """Row A's in-flight step fails to read just after B joined and a step was queued
    for both: A fails, and B (reloaded from what it had read) answers as it does alone."""
    long = request(range(200, 230), "A", 300)
    short = request(range(300, 320), "B", 12)
    alone = asyncio.run(outcome(engine_of(max_batch_size=4), short))
    assert isinstance(alone, Finished)
    engine = engine_of(max_batch_size=4, overlap_steps=True)
    joined: dict[str, Any] = {}
    original = engine._decode_pass

    def decode_pass(bundle: Any, runner: Any) -> None:
        in_flight = engine._in_flight
        rows = engine._decoding
        if (not joined.get("fired") and in_flight is not None and len(rows) == 2
                and rows[1].handle is joined.get("B") and len(rows[1].generated) == 1):
            step: SampledStep = in_flight[1]

            def fail() -> Any:
                raise RuntimeError("injected read failure")

            step.to_host = fail  # type: ignore[method-assign]
            joined["fired"] = True
        original(bundle, runner)

    engine._decode_pass = decode_pass

    async def scenario() -> tuple[GenerationEvent, GenerationEvent]:
        first = engine.submit(long)
        while engine.stats()["decode_steps"] < 3:
            await asyncio.sleep(0.001)
        joined["B"] = second = engine.submit(short)
        a, b = await asyncio.gather(last_event(first), last_event(second))
        return a, b

    a, b = asyncio.run(scenario())
    assert joined.get("fired"), "the injected fault never ran"
    assert isinstance(a, Failed)
    assert isinstance(b, Finished) and b.token_ids == alone.token_ids
    assert all_blocks_back(engine)


def test_a_request_whose_audio_does_not_match_its_prompt_fails_alone(
    bundle: ModelBundle, engine_of: Any
) -> None:
    engine = engine_of(max_batch_size=4)
    samples = decode_audio(wav_bytes(tone(1.0, 330.0)), format_hint="wav", max_seconds=30)
    bad = replace(request([100, 101, 102, 103], "bad", 5), audio=[bundle.mel.extract(samples)])
    good = request(range(100, 120), "good", 5)

    async def scenario() -> tuple[GenerationEvent, GenerationEvent]:
        first, second = engine.submit(bad), engine.submit(good)
        return await last_event(first), await last_event(second)

    failed, finished = asyncio.run(scenario())
    assert isinstance(failed, Failed) and "audio" in failed.error.message
    assert isinstance(finished, Finished)
    assert engine.stats()["queue_depth"] == 0


def test_choices_that_never_fit_together_prefill_one_by_one(engine_of: Any) -> None:
    """Two choices of a 250-token prompt on a 16-block cache: the prompt's 16 blocks fit
    but not one more for the second choice, so each choice prefills alone; nothing
    queued behind them waits for ever."""
    engine = engine_of(max_batch_size=4, cache=CacheOptions(num_blocks=16))
    first = request([100 + i % 50 for i in range(250)], "n", 6, temperature=1.0, seed=1)
    small = request(range(100, 110), "small", 3)

    async def scenario() -> list[GenerationEvent]:
        handles = [*engine.submit_group(choices(first, 2)), engine.submit(small)]
        return list(await asyncio.gather(*(last_event(h) for h in handles)))

    events = asyncio.run(scenario())
    assert all(isinstance(event, Finished) for event in events), events
    assert all_blocks_back(engine)

"""A model fault fails only the requests it was for; the engine keeps serving."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from oai_audio_server.engine.core import BatchingEngine
from oai_audio_server.engine.loader import ModelBundle, load_bundle
from oai_audio_server.engine.types import (
    Failed,
    Finished,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)
from oai_audio_server.errors import EngineError
from oai_audio_server.settings import Settings

POISON = 7  # a byte token id; prompts containing it make the (patched) model fail


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint: Path) -> ModelBundle:
    return load_bundle(Settings(model=str(tiny_checkpoint)))


@pytest.fixture()
def engine(bundle: ModelBundle) -> Iterator[BatchingEngine]:
    model = bundle.model
    assert model is not None
    original = model.embed_prompts  # the first model call a newcomer's prefill makes

    def failing_embed(prompts: Any, *args: Any, **kwargs: Any) -> Any:
        if any(POISON in prompt for prompt in prompts):
            raise RuntimeError("poisoned prompt")
        return original(prompts, *args, **kwargs)

    model.embed_prompts = failing_embed  # type: ignore[method-assign]
    engine = started_engine(bundle, max_batch_size=4)
    yield engine
    engine.close()
    model.embed_prompts = original  # type: ignore[method-assign]


def started_engine(bundle: ModelBundle, **limits: int) -> BatchingEngine:
    engine = BatchingEngine(lambda: bundle, **limits)
    engine.start()
    deadline = time.monotonic() + 30
    while not engine.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    return engine


def request(prompt: list[int], max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        request_id=str(prompt[:3]), prompt_ids=prompt, audio=[],
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


async def collect(engine: BatchingEngine, req: GenerationRequest,
                  started: asyncio.Event | None = None) -> list[GenerationEvent]:
    handle = engine.submit(req)
    events: list[GenerationEvent] = []
    while True:
        event = await asyncio.wait_for(handle.next_event(), 60)
        events.append(event)
        if started is not None and isinstance(event, TextDelta):
            started.set()
        if isinstance(event, Finished | Failed):
            return events


def test_a_failing_newcomer_leaves_the_running_batch_alone(
    engine: BatchingEngine, bundle: ModelBundle
) -> None:
    good = request([bundle.tokenizer.im_start_id, 40, 41, 42, 43, 44, 45, 46], 60)
    bad = request([POISON] * 4, 10)

    async def scenario() -> tuple[list[GenerationEvent], list[GenerationEvent]]:
        started = asyncio.Event()
        running = asyncio.create_task(collect(engine, good, started))
        await asyncio.wait_for(started.wait(), 60)
        failed = await collect(engine, bad)
        return await running, failed

    good_events, bad_events = asyncio.run(scenario())
    assert isinstance(bad_events[-1], Failed)
    assert isinstance(bad_events[-1].error, EngineError)
    assert "poisoned prompt" in bad_events[-1].error.message
    assert isinstance(good_events[-1], Finished)

    alone = asyncio.run(collect(engine, good))
    assert isinstance(alone[-1], Finished)
    assert alone[-1].token_ids == good_events[-1].token_ids
    deadline = time.monotonic() + 10  # the row leaves right after its last event
    while engine.stats()["batch_size"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["batch_size"] == 0


def test_a_fault_outside_the_model_calls_keeps_the_worker_alive(
    engine: BatchingEngine, bundle: ModelBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Freeing a finished row's slot fails once (as a device error would): the rows in
    flight fail, the worker stays alive with an empty batch and serves the next one."""
    from oai_audio_server.engine import batch as batch_module

    calls = {"n": 0}
    original = batch_module.DeviceRows.clear_from

    def clear_once_failing(self: Any, start: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device error while freeing a slot")
        original(self, start)

    monkeypatch.setattr(batch_module.DeviceRows, "clear_from", clear_once_failing)
    first = request([bundle.tokenizer.im_start_id, 40, 41, 42, 43, 44, 45, 46], 60)
    joiner = request([bundle.tokenizer.im_start_id, 50, 51], 10)

    async def scenario() -> tuple[list[GenerationEvent], list[GenerationEvent]]:
        started = asyncio.Event()
        running = asyncio.create_task(collect(engine, first, started))
        await asyncio.wait_for(started.wait(), 60)
        joined = await collect(engine, joiner)
        return await running, joined

    first_events, joiner_events = asyncio.run(scenario())
    assert isinstance(joiner_events[-1], Finished)  # it had finished: its slot was freed
    assert isinstance(first_events[-1], Failed)  # it was in the batch that failed
    assert isinstance(first_events[-1].error, EngineError)
    assert calls["n"] >= 1
    later = asyncio.run(collect(engine, first))
    assert isinstance(later[-1], Finished)  # the worker is still serving
    assert engine.ready and engine.stats()["batch_size"] == 0


def test_a_group_needs_one_queue_slot(bundle: ModelBundle) -> None:
    """A long transcription's segments are admitted together, even with --max-queue 1."""
    engine = started_engine(bundle, max_batch_size=2, max_queue=1)
    try:
        requests = [request([bundle.tokenizer.im_start_id, 60 + i], 5) for i in range(4)]

        async def scenario() -> list[GenerationEvent]:
            handles = engine.submit_group(requests)
            ends = []
            for handle in handles:
                async for event in handle.events():
                    ends.append(event)
            return [e for e in ends if isinstance(e, Finished | Failed)]

        ends = asyncio.run(scenario())
        assert len(ends) == 4 and all(isinstance(e, Finished) for e in ends)
    finally:
        engine.close()

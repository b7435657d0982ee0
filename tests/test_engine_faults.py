"""A model fault fails only the requests it was for; the engine keeps serving."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from oai_audio_server.engine.loader import ModelBundle, load_bundle
from oai_audio_server.engine.scheduler import BatchingEngine
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
    transformer = bundle.model.transformer
    original = transformer.forward

    def failing_forward(*args: Any, **kwargs: Any) -> Any:
        input_ids = kwargs["input_ids"]
        if input_ids.shape[1] > 1 and bool((input_ids == POISON).any()):
            raise RuntimeError("poisoned prompt")
        return original(*args, **kwargs)

    transformer.forward = failing_forward
    engine = BatchingEngine(lambda: bundle, max_batch_size=4)
    engine.start()
    deadline = time.monotonic() + 30
    while not engine.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    yield engine
    engine.close()
    transformer.forward = original


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

"""The engine in its own process: the same answers as in-process, the queue bounded on
the server's side, cancellation, a crash or a failed load reported, a clean close."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from media import tone, wav_bytes

from oai_audio_server.audio.decode import decode_audio
from oai_audio_server.audio.types import PreparedAudio
from oai_audio_server.engine.core import BatchingEngine
from oai_audio_server.engine.loader import load_bundle
from oai_audio_server.engine.process import EngineProcess
from oai_audio_server.engine.types import (
    Failed,
    Finished,
    GenerationHandle,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)
from oai_audio_server.errors import EngineError, NotReadyError, OverloadedError
from oai_audio_server.qwen.conversation import AudioItem, Conversation, TextItem, UserItem
from oai_audio_server.qwen.prompt import QwenPromptBuilder
from oai_audio_server.settings import Settings

TIMEOUT = 60.0


def wait_for(condition: object, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def started(model: str, **limits: int) -> EngineProcess:
    engine = EngineProcess(Settings(model=model, device="cpu", cpu_threads=1), **limits)
    engine.start()
    wait_for(lambda: engine.ready or engine.load_error is not None, "the engine process")
    return engine


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Iterator[EngineProcess]:
    engine = started(str(tiny_checkpoint), max_batch_size=4, max_queue=4)
    assert engine.ready, engine.load_error
    yield engine
    engine.close()


async def outcome(handle: GenerationHandle) -> tuple[str, Finished | Failed]:
    parts = []
    async for event in handle.events():
        if isinstance(event, TextDelta):
            parts.append(event.text)
        else:
            assert isinstance(event, Finished | Failed)
            return "".join(parts), event
    raise AssertionError("events ended without Finished or Failed")


def build(
    engine: EngineProcess, name: str, *items: UserItem, **sampling: object
) -> GenerationRequest:
    bundle = engine.bundle
    builder = QwenPromptBuilder(bundle.tokenizer, max_window_size=bundle.max_window_size)
    prompt = builder.build(Conversation(query=tuple(items)))
    params = SamplingParams(**{"max_tokens": 40, "temperature": 0.0, **sampling})  # type: ignore[arg-type]
    return GenerationRequest(name, prompt.token_ids, prompt.audio_segments, params)


def test_answers_equal_the_same_requests_in_process(
    engine: EngineProcess, tiny_checkpoint: Path
) -> None:
    samples = decode_audio(wav_bytes(tone(1.3, 330.0)), format_hint="wav", max_seconds=30)
    audio = PreparedAudio("tone", 1.3, (engine.bundle.mel.extract(samples),))
    requests = [
        build(engine, "text", TextItem("Say something")),
        build(engine, "audio", AudioItem(audio), TextItem("What can you hear?")),
        build(engine, "sampled", TextItem("Hello"), temperature=0.8, top_p=0.9, seed=11),
        build(engine, "stop", TextItem("Describe it"), stop=("e",)),
    ]

    Outcomes = list[tuple[str, Finished | Failed]]

    async def through(target: EngineProcess | BatchingEngine) -> Outcomes:
        handles = [target.submit(r) for r in requests]
        return await asyncio.wait_for(asyncio.gather(*(outcome(h) for h in handles)), TIMEOUT)

    remote = asyncio.run(through(engine))
    bundle = load_bundle(Settings(model=str(tiny_checkpoint), device="cpu"))
    local_engine = BatchingEngine(lambda: bundle, max_batch_size=4)
    local_engine.start()
    try:
        wait_for(lambda: local_engine.ready, "the in-process engine")
        local = asyncio.run(through(local_engine))
    finally:
        local_engine.close()
    for (remote_text, remote_end), (local_text, local_end) in zip(remote, local, strict=True):
        assert isinstance(remote_end, Finished) and isinstance(local_end, Finished)
        assert remote_end.token_ids == local_end.token_ids
        assert remote_text == local_text
        assert remote_end.reason == local_end.reason
    assert remote[3][1].reason == "stop"  # a stop string ended it, on the engine's side
    stats = engine.stats()
    assert stats["finished"] >= 4 and stats["prefills"] >= 1 and stats["failed"] == 0


def test_the_queue_is_bounded_here_and_a_cancel_frees_its_slot_at_once(
    engine: EngineProcess,
) -> None:
    long = build(engine, "long", TextItem("Hello"), max_tokens=2000)  # ends after 603
    short = build(engine, "short", TextItem("hi"), max_tokens=4)

    async def scenario() -> None:
        running = [engine.submit(replace(long, request_id=f"run-{i}")) for i in range(4)]
        await asyncio.sleep(0)
        deadline = time.monotonic() + TIMEOUT
        while engine.stats()["queue_depth"] > 0 or engine.stats()["batch_size"] < 4:
            assert time.monotonic() < deadline, "the batch did not fill"
            await asyncio.sleep(0.01)
        waiting = [engine.submit(replace(short, request_id=f"wait-{i}")) for i in range(4)]
        assert engine.stats()["queue_depth"] == 4
        with pytest.raises(OverloadedError):
            engine.submit(short)
        waiting[0].cancel()  # its slot is free before the engine has even heard of it
        assert engine.stats()["queue_depth"] == 3
        third = engine.submit(short)
        for handle in running:
            handle.cancel()  # the rows leave; the waiting ones run
        text, end = await asyncio.wait_for(outcome(third), TIMEOUT)
        assert isinstance(end, Finished) and end.completion_tokens <= 4
        for handle in waiting[1:]:
            _, end = await asyncio.wait_for(outcome(handle), TIMEOUT)
            assert isinstance(end, Finished)

    asyncio.run(scenario())
    wait_for(lambda: engine.stats()["batch_size"] == 0, "the batch to empty")
    assert engine.stats()["rejected_overloaded"] >= 1
    assert engine.stats()["cancelled"] >= 4


def test_a_crashed_engine_fails_its_requests_and_stops_being_ready(
    tiny_checkpoint: Path,
) -> None:
    engine = started(str(tiny_checkpoint), max_batch_size=2)
    try:
        long = build(engine, "long", TextItem("Hello"), max_tokens=2000)  # ends after 603

        async def scenario() -> tuple[str, Finished | Failed]:
            handle = engine.submit(long)
            first = await asyncio.wait_for(handle.next_event(), TIMEOUT)
            assert isinstance(first, TextDelta)
            assert engine.pid is not None
            os.kill(engine.pid, signal.SIGKILL)
            return await asyncio.wait_for(outcome(handle), TIMEOUT)

        _, end = asyncio.run(scenario())
        assert isinstance(end, Failed) and isinstance(end.error, EngineError)
        assert "engine process stopped" in end.error.message
        wait_for(lambda: not engine.ready, "ready to turn false")
        assert engine.crash_reason is not None and "exit code" in engine.crash_reason
        assert engine.load_error is None  # it had loaded: a crash, not a failed load

        async def after() -> None:
            engine.submit(long)

        with pytest.raises(NotReadyError):
            asyncio.run(after())
    finally:
        engine.close()
    assert not engine.is_alive()


def test_a_failed_load_is_reported_and_the_process_ends(tmp_path: Path) -> None:
    engine = started(str(tmp_path / "no-such-model"))
    try:
        assert not engine.ready
        assert "neither a checkpoint directory nor a hub id" in str(engine.load_error)
        wait_for(lambda: not engine.is_alive(), "the engine process to end")
    finally:
        engine.close()


def test_close_fails_what_is_in_flight_and_ends_the_process(tiny_checkpoint: Path) -> None:
    engine = started(str(tiny_checkpoint), max_batch_size=1)
    long = build(engine, "long", TextItem("Hello"), max_tokens=2000)  # ends after 603

    async def scenario() -> list[tuple[str, Finished | Failed]]:
        handles = [engine.submit(long), engine.submit(long)]  # one running, one queued
        await asyncio.wait_for(handles[0].next_event(), TIMEOUT)
        loop = asyncio.get_running_loop()
        closing = loop.run_in_executor(None, engine.close)
        ends = await asyncio.wait_for(asyncio.gather(*(outcome(h) for h in handles)), TIMEOUT)
        await asyncio.wait_for(closing, TIMEOUT)
        return ends

    ends = asyncio.run(scenario())
    for _, end in ends:
        assert isinstance(end, Failed) and isinstance(end.error, NotReadyError)
    assert not engine.is_alive() and not engine.ready


def test_stop_while_the_model_loads_ends_the_process_at_once(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """A load cannot be interrupted (a download or a CUDA call may take minutes): a
    stop that arrives meanwhile ends the engine process itself, with status 0, instead
    of leaving it to be killed after close()'s timeout."""
    slow = tmp_path / "slow_loading_ckpt"
    shutil.copytree(tiny_checkpoint, slow)
    # A vocabulary file that never arrives: the load blocks reading it, like a slow disk
    # (the tokenizer asks only that the path exists, then reads it).
    (slow / "qwen.tiktoken").unlink()
    os.mkfifo(slow / "qwen.tiktoken")
    engine = EngineProcess(Settings(model=str(slow), device="cpu", cpu_threads=1))
    engine.start()
    wait_for(lambda: engine.pid is not None and engine.is_alive(), "the engine process")
    time.sleep(3)  # well into the load (blocked reading the vocabulary)
    engine.close(timeout=60)
    assert not engine.is_alive()
    assert engine._process.exitcode == 0  # ended itself; killed would be -9
    assert engine.load_error is None and not engine.ready


def test_a_request_that_cannot_be_sent_fails_and_frees_its_slot(engine: EngineProcess) -> None:
    unpicklable = GenerationRequest(
        "bad", [1, 2, 3], [lambda: None], SamplingParams(max_tokens=4)  # type: ignore[list-item]
    )

    async def scenario() -> tuple[str, Finished | Failed]:
        return await asyncio.wait_for(outcome(engine.submit(unpicklable)), TIMEOUT)

    _, end = asyncio.run(scenario())
    assert isinstance(end, Failed) and isinstance(end.error, EngineError)
    assert "could not be sent" in end.error.message
    assert engine.stats()["queue_depth"] == 0 and engine.ready

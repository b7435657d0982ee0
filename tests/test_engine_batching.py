"""The batching engine in-process: batched answers equal solo answers, rows join and
leave a running batch, and cancellation, timeouts and a full queue behave."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from media import tone, wav_bytes

from oai_audio_server.audio.decode import decode_audio
from oai_audio_server.audio.types import PreparedAudio
from oai_audio_server.engine.cache_plan import CacheOptions
from oai_audio_server.engine.core import BatchingEngine
from oai_audio_server.engine.handles import RequestHandle
from oai_audio_server.engine.loader import ModelBundle, load_bundle
from oai_audio_server.engine.types import (
    Failed,
    Finished,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)
from oai_audio_server.errors import OverloadedError, RequestTimeoutError
from oai_audio_server.qwen.conversation import AudioItem, Conversation, TextItem, UserItem
from oai_audio_server.qwen.prompt import QwenPromptBuilder
from oai_audio_server.settings import Settings

T = TypeVar("T")
RUN_TIMEOUT_SECONDS = 60.0


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny model's ops are far too small for intra-op threads: on a busy or small
    machine spinning OpenMP workers make every step many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint: Path) -> ModelBundle:
    return load_bundle(Settings(model=str(tiny_checkpoint), device="cpu"))


@pytest.fixture(scope="module")
def builder(bundle: ModelBundle) -> QwenPromptBuilder:
    return QwenPromptBuilder(bundle.tokenizer, max_window_size=bundle.max_window_size)


@pytest.fixture(scope="module")
def audio(bundle: ModelBundle) -> PreparedAudio:
    samples = decode_audio(wav_bytes(tone(1.3, 330.0)), format_hint="wav", max_seconds=30)
    return PreparedAudio(
        digest="tone", duration_seconds=1.3, segments=(bundle.mel.extract(samples),)
    )


@dataclass(frozen=True)
class Outcome:
    text: str
    end: Finished | Failed

    @property
    def finished(self) -> Finished:
        assert isinstance(self.end, Finished), self.end
        return self.end


def run(work: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(work, RUN_TIMEOUT_SECONDS)

    return asyncio.run(bounded())


@contextmanager
def engine_for(bundle: ModelBundle, **limits: Any) -> Iterator[BatchingEngine]:
    engine = BatchingEngine(lambda: bundle, **limits)
    engine.start()
    deadline = time.monotonic() + 30
    while not engine.ready:
        assert time.monotonic() < deadline, "engine did not start"
        time.sleep(0.01)
    try:
        yield engine
    finally:
        engine.close()


async def collect(handle: RequestHandle) -> Outcome:
    parts: list[str] = []
    async for event in handle.events():
        if isinstance(event, TextDelta):
            parts.append(event.text)
        else:
            return Outcome("".join(parts), event)
    raise AssertionError("event stream ended without Finished or Failed")


async def wait_until(condition: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


def solo(bundle: ModelBundle, requests: list[GenerationRequest]) -> list[Outcome]:
    """Each request alone in an otherwise idle engine."""

    async def one_by_one(engine: BatchingEngine) -> list[Outcome]:
        return [await collect(engine.submit(request)) for request in requests]

    with engine_for(bundle, max_batch_size=1) as engine:
        outcomes = run(one_by_one(engine))
        assert engine.stats()["peak_batch_size"] == 1
    return outcomes


def request(
    builder: QwenPromptBuilder,
    name: str,
    *items: UserItem,
    max_tokens: int = 32,
    **sampling: object,
) -> GenerationRequest:
    prompt = builder.build(Conversation(query=tuple(items)))
    params = SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, **sampling})  # type: ignore[arg-type]
    return GenerationRequest(name, prompt.token_ids, prompt.audio_segments, params)


def varied_requests(
    builder: QwenPromptBuilder, audio: PreparedAudio
) -> list[GenerationRequest]:
    """Different prompt lengths (text and audio) and different max_tokens."""
    return [
        request(builder, "long", TextItem("Say something"), max_tokens=160),
        request(builder, "audio-q", AudioItem(audio), TextItem("What can you hear?"),
                max_tokens=48),
        request(builder, "hi", TextItem("hi"), max_tokens=64),
        request(builder, "fox", TextItem("The quick brown fox jumps over the lazy dog. " * 3),
                max_tokens=40),
        request(builder, "audio-first", TextItem("Describe it"), AudioItem(audio),
                max_tokens=90),
        request(builder, "hello", TextItem("Hello"), max_tokens=120),
        request(builder, "describe", TextItem("Describe it"), max_tokens=100),
    ]


def all_at_once(
    bundle: ModelBundle, requests: list[GenerationRequest]
) -> tuple[list[Outcome], dict[str, float]]:
    """Every request submitted in one go to an engine with room for all of them."""

    async def together(engine: BatchingEngine) -> list[Outcome]:
        handles = [engine.submit(r) for r in requests]
        return await asyncio.gather(*(collect(h) for h in handles))

    with engine_for(bundle, max_batch_size=8) as engine:
        return run(together(engine)), engine.stats()


def assert_same(batched: list[Outcome], alone: list[Outcome]) -> None:
    for got, expected in zip(batched, alone, strict=True):
        assert got.finished.token_ids == expected.finished.token_ids
        assert got.text == expected.text
        assert got.finished.reason == expected.finished.reason
        assert got.finished.completion_tokens == len(got.finished.token_ids)


def test_submitted_at_once_batched_greedy_equals_solo(
    bundle: ModelBundle, builder: QwenPromptBuilder, audio: PreparedAudio
) -> None:
    requests = varied_requests(builder, audio)
    alone = solo(bundle, requests)

    batched, stats = all_at_once(bundle, requests)
    assert_same(batched, alone)
    total = sum(len(o.finished.token_ids) for o in alone)
    assert stats["completion_tokens"] == total
    assert stats["peak_batch_size"] >= 2
    # One decode step advances every row: far fewer steps than tokens.
    assert stats["decode_steps"] < total / 2
    assert stats["finished"] == len(requests) and stats["failed"] == 0


def test_staggered_requests_join_a_running_batch(
    bundle: ModelBundle, builder: QwenPromptBuilder, audio: PreparedAudio
) -> None:
    requests = varied_requests(builder, audio)
    alone = solo(bundle, requests)
    assert len(alone[0].finished.token_ids) == 160, "the first request must run throughout"

    async def staggered(engine: BatchingEngine) -> tuple[list[Outcome], list[int]]:
        tasks: list[asyncio.Task[Outcome]] = []
        running_at_submit: list[int] = []
        for r in requests:
            running_at_submit.append(int(engine.stats()["batch_size"]))
            prefills = engine.stats()["prefills"]
            tasks.append(asyncio.create_task(collect(engine.submit(r))))
            # The next one arrives after this one joined and decoded with the others (a
            # prompt longer than the batch's cache waits until the cache has grown).
            await wait_until(lambda p=prefills: engine.stats()["prefills"] > p, "a prefill")
            steps = engine.stats()["decode_steps"]
            await wait_until(lambda s=steps: engine.stats()["decode_steps"] >= s + 3,
                             "decode steps")
        return list(await asyncio.gather(*tasks)), running_at_submit

    with engine_for(bundle, max_batch_size=8) as engine:
        batched, running_at_submit = run(staggered(engine))
        stats = engine.stats()
    assert_same(batched, alone)
    assert stats["prefills"] == len(requests)  # each one joined on its own
    assert min(running_at_submit[1:]) >= 1  # ... while a batch was running
    assert stats["peak_batch_size"] >= 4
    total = sum(len(o.finished.token_ids) for o in alone)
    assert stats["decode_steps"] < total / 2


def test_joiners_gather_for_a_few_steps_and_join_in_one_prefill(
    bundle: ModelBundle, builder: QwenPromptBuilder
) -> None:
    """With --join-wait-steps 5, a request arriving at a running batch with room waits
    5 decode steps (not for the batch to drain), and requests arriving within those
    steps join with it in one prefill."""
    first = request(builder, "first", TextItem("Say something"), max_tokens=160)
    joiners = [
        request(builder, "a", TextItem("hi"), max_tokens=20),
        request(builder, "b", TextItem("Hello"), max_tokens=20),
    ]
    alone = solo(bundle, [first, *joiners])

    async def scenario(engine: BatchingEngine) -> tuple[list[Outcome], int, int]:
        tasks = [asyncio.create_task(collect(engine.submit(first)))]
        await wait_until(lambda: engine.stats()["decode_steps"] >= 3, "3 steps")
        submitted_at = int(engine.stats()["decode_steps"])
        tasks.append(asyncio.create_task(collect(engine.submit(joiners[0]))))
        await wait_until(lambda: engine.stats()["decode_steps"] >= submitted_at + 2, "steps")
        assert engine.stats()["prefills"] == 1  # still gathering
        tasks.append(asyncio.create_task(collect(engine.submit(joiners[1]))))
        await wait_until(lambda: engine.stats()["prefills"] >= 2, "the join")
        joined_at = int(engine.stats()["decode_steps"])
        return [await task for task in tasks], submitted_at, joined_at

    with engine_for(bundle, max_batch_size=8, join_wait_steps=5) as engine:
        outcomes, submitted_at, joined_at = run(scenario(engine))
        stats = engine.stats()
    assert_same(outcomes, alone)
    assert stats["prefills"] == 2  # both joiners in one prefill
    assert stats["peak_batch_size"] == 3
    # It waited its 5 steps, and far less than the 160 the first row runs.
    assert 5 <= joined_at - submitted_at <= 40


def test_mixed_sampling_parameters_in_one_batch(
    bundle: ModelBundle, builder: QwenPromptBuilder, audio: PreparedAudio
) -> None:
    plain = request(builder, "probe", TextItem("Hello"), max_tokens=40)
    (probe,) = solo(bundle, [plain])
    # A stop string the greedy answer really contains, well inside it.
    stop = probe.text[12:15]
    assert len(stop) == 3 and probe.text.find(stop) > 0
    requests = [
        request(builder, "greedy", TextItem("Say something"), max_tokens=30),
        request(builder, "top-p", TextItem("Say something"), max_tokens=45,
                temperature=0.8, seed=7, top_p=0.9),
        request(builder, "top-k", AudioItem(audio), TextItem("What is said?"), max_tokens=25,
                temperature=1.2, seed=11, top_k=20),
        request(builder, "penalty", TextItem("Hello"), max_tokens=35, repetition_penalty=1.3),
        replace(plain, request_id="stop", sampling=replace(plain.sampling, stop=(stop,))),
        request(builder, "everything", TextItem("hi"), max_tokens=50, temperature=0.7, seed=3,
                top_p=0.5, top_k=50, repetition_penalty=1.1),
    ]
    alone = solo(bundle, requests)

    batched, stats = all_at_once(bundle, requests)
    assert_same(batched, alone)
    assert stats["peak_batch_size"] >= 2
    by_id = {r.request_id: o for r, o in zip(requests, batched, strict=True)}
    assert by_id["stop"].finished.reason == "stop"
    assert stop not in by_id["stop"].text and by_id["stop"].text
    assert by_id["greedy"].finished.reason == "length"
    assert len(by_id["greedy"].finished.token_ids) == 30
    lengths = {len(o.finished.token_ids) for o in batched}
    assert len(lengths) >= 4  # every row stopped on its own
    # Sampling really sampled: the seeded rows differ from greedy on the same prompt.
    greedy_same_prompt = solo(bundle, [replace(requests[1], sampling=SamplingParams(45, 0.0))])
    assert greedy_same_prompt[0].finished.token_ids != by_id["top-p"].finished.token_ids


def test_a_cancelled_row_leaves_and_the_others_are_unchanged(
    bundle: ModelBundle, builder: QwenPromptBuilder, audio: PreparedAudio
) -> None:
    keep_a = request(builder, "a", TextItem("Say something"), max_tokens=120)
    doomed = request(builder, "b", TextItem("Hello"), max_tokens=500)
    keep_c = request(builder, "c", AudioItem(audio), TextItem("What can you hear?"),
                     max_tokens=60)
    alone = solo(bundle, [keep_a, keep_c])

    async def scenario(engine: BatchingEngine) -> tuple[list[Outcome], int]:
        first = asyncio.create_task(collect(engine.submit(keep_a)))
        handle = engine.submit(doomed)
        third = asyncio.create_task(collect(engine.submit(keep_c)))
        seen = 0
        while seen < 3:
            event = await handle.next_event()
            assert isinstance(event, TextDelta)
            seen += 1
        handle.cancel()
        outcomes = list(await asyncio.gather(first, third))
        return outcomes, int(engine.stats()["completion_tokens"])

    with engine_for(bundle, max_batch_size=8) as engine:
        outcomes, completion_tokens = run(scenario(engine))
        stats = engine.stats()
    assert_same(outcomes, alone)
    assert stats["cancelled"] == 1 and stats["finished"] == 2
    # The cancelled row stopped long before its 500 tokens.
    assert completion_tokens - 180 < 200


def test_cancelled_while_waiting_never_runs(
    bundle: ModelBundle, builder: QwenPromptBuilder
) -> None:
    running = request(builder, "running", TextItem("Say something"), max_tokens=150)
    waiting = request(builder, "waiting", TextItem("hi"), max_tokens=20)

    async def scenario(engine: BatchingEngine) -> Outcome:
        first = asyncio.create_task(collect(engine.submit(running)))
        await wait_until(lambda: engine.stats()["batch_size"] == 1, "the first row")
        engine.submit(waiting).cancel()
        return await first

    with engine_for(bundle, max_batch_size=1) as engine:
        outcome = run(scenario(engine))
        stats = engine.stats()
    assert outcome.finished.reason == "length"
    assert stats["prefills"] == 1 and stats["cancelled"] == 1 and stats["queue_depth"] == 0


def test_deadline_fails_a_running_row_and_a_waiting_one_on_time(
    bundle: ModelBundle, builder: QwenPromptBuilder
) -> None:
    long_running = request(builder, "long", TextItem("Hello"), max_tokens=600)
    assert len(solo(bundle, [long_running])[0].finished.token_ids) == 600

    async def scenario(engine: BatchingEngine) -> tuple[Outcome, Outcome, bool]:
        first_handle = engine.submit(long_running)
        first = asyncio.create_task(collect(first_handle))
        await wait_until(lambda: engine.stats()["batch_size"] == 1, "the first row")
        # Waits behind a batch of one: must fail at its deadline, not when the batch drains.
        late = replace(long_running, request_id="late", deadline=time.monotonic() + 0.05)
        queued = await collect(engine.submit(late))
        still_running = not first.done()
        first_handle.cancel()  # the batch is free for the next one at the next step
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await wait_until(lambda: engine.stats()["batch_size"] == 0, "the cancel")
        running_late = replace(long_running, request_id="x", deadline=time.monotonic() + 0.1)
        # Also fails mid-generation once its deadline passes.
        timed_out = await collect(engine.submit(running_late))
        return queued, timed_out, still_running

    with engine_for(bundle, max_batch_size=1) as engine:
        queued, timed_out, still_running = run(scenario(engine))
    for outcome in (queued, timed_out):
        assert isinstance(outcome.end, Failed)
        assert isinstance(outcome.end.error, RequestTimeoutError)
        assert outcome.end.error.status == 408
    assert still_running
    # A retry may get a queued request in; a generation cut off would be cut off again.
    assert "x-should-retry" not in queued.end.error.headers
    assert timed_out.end.error.headers["x-should-retry"] == "false"


def test_peak_batch_counts_rows_that_finish_with_their_first_token(
    bundle: ModelBundle, builder: QwenPromptBuilder
) -> None:
    one_token = request(builder, "one", TextItem("Hello"), max_tokens=1)

    async def scenario(engine: BatchingEngine) -> Outcome:
        return await collect(engine.submit(one_token))

    with engine_for(bundle, max_batch_size=8) as engine:
        outcome = run(scenario(engine))
        stats = engine.stats()
    assert outcome.finished.completion_tokens == 1
    assert stats["peak_batch_size"] == 1 and stats["batch_size"] == 0


def test_a_row_cancelled_between_steps_empties_the_reported_batch(
    bundle: ModelBundle, builder: QwenPromptBuilder
) -> None:
    """Cancelled right after a step (here from the step hook), the row leaves before the
    next one; /health must then say the batch is empty, not wait for the next request."""
    running: list[RequestHandle] = []

    def cancel_after_three_steps() -> None:
        if running and engine.stats()["decode_steps"] >= 3:
            running[0].cancel()

    async def scenario(engine: BatchingEngine) -> None:
        running.append(engine.submit(request(builder, "long", TextItem("Hello"),
                                             max_tokens=600)))
        await wait_until(lambda: engine.stats()["cancelled"] == 1, "the cancel")
        await wait_until(lambda: engine.stats()["batch_size"] == 0, "an empty batch", 5.0)

    with engine_for(bundle, max_batch_size=8, on_step=cancel_after_three_steps) as engine:
        run(scenario(engine))


def test_full_queue_is_overloaded_with_retry_after(
    bundle: ModelBundle, builder: QwenPromptBuilder
) -> None:
    slow = request(builder, "slow", TextItem("Hello"), max_tokens=600)

    async def scenario(engine: BatchingEngine) -> OverloadedError:
        handles = [engine.submit(slow)]
        await wait_until(lambda: engine.stats()["batch_size"] == 1, "the first row")
        handles.append(engine.submit(slow))  # the one queue slot
        try:
            with pytest.raises(OverloadedError) as caught:
                engine.submit(slow)
            return caught.value
        finally:
            for handle in handles:
                handle.cancel()

    with engine_for(bundle, max_batch_size=1, max_queue=1) as engine:
        error = run(scenario(engine))
        stats = engine.stats()
    assert error.status == 429 and error.headers["Retry-After"].isdigit()
    assert error.to_body()["error"]["type"] == "rate_limit_error"
    assert stats["rejected_overloaded"] == 1


def test_text_is_handed_over_at_the_requested_pace_and_adds_up(
    bundle: ModelBundle, builder: QwenPromptBuilder
) -> None:
    """Every step's text (interval 0), the first text and then the rest at the end
    (interval inf): the same answer either way, in far fewer deliveries."""
    base = request(builder, "paced", TextItem("Hello"), max_tokens=60)

    async def pieces(engine: BatchingEngine, interval: float) -> list[str]:
        handle = engine.submit(replace(base, text_interval=interval))
        return [e.text async for e in handle.events() if isinstance(e, TextDelta)]

    with engine_for(bundle, max_batch_size=1) as engine:
        every = run(pieces(engine, 0.0))
        whole = run(pieces(engine, float("inf")))
    assert len(every) > 10  # one piece per token or so
    assert len(whole) == 2  # the first text, then the rest with the end
    assert "".join(whole) == "".join(every)


def test_a_row_joins_a_running_batch_at_every_step_offset(
    bundle: ModelBundle, builder: QwenPromptBuilder, audio: PreparedAudio
) -> None:
    first = request(builder, "first", AudioItem(audio), TextItem("What is said?"),
                    max_tokens=40)
    joiner = request(builder, "joiner", TextItem("The quick brown fox jumps"), max_tokens=12)
    alone = solo(bundle, [first, joiner])
    assert len(alone[0].finished.token_ids) == 40, "the first row must run throughout"

    async def join_at(engine: BatchingEngine, offset: int) -> tuple[list[Outcome], int]:
        task = asyncio.create_task(collect(engine.submit(first)))
        await wait_until(lambda: engine.stats()["decode_steps"] >= offset, "steps")
        joined_at = int(engine.stats()["decode_steps"])
        second = await collect(engine.submit(joiner))
        return [await task, second], joined_at

    seen_offsets = set()
    for offset in range(1, 21):
        with engine_for(bundle, max_batch_size=4) as engine:
            outcomes, joined_at = run(join_at(engine, offset))
            stats = engine.stats()
        assert_same(outcomes, alone)
        assert stats["peak_batch_size"] == 2 and stats["prefills"] == 2
        seen_offsets.add(joined_at)
    assert len(seen_offsets) >= 10  # really joined at many different points


def test_a_3000_token_prompt_decodes_in_one_batch_with_short_ones(
    bundle: ModelBundle, builder: QwenPromptBuilder
) -> None:
    """Past the model's 2048-token seq_length the long row gets its own NTK alpha and
    log-n scaling while short rows keep theirs, in the same decode steps."""
    text = " ".join(f"word{i % 97}" for i in range(1500))
    long = request(builder, "long", TextItem(text), max_tokens=24)
    assert len(long.prompt_ids) > 3000
    requests = [
        long,
        request(builder, "short", TextItem("hi"), max_tokens=30),
        request(builder, "short2", TextItem("Hello"), max_tokens=20),
    ]
    alone = solo(bundle, requests)
    batched, stats = all_at_once(bundle, requests)
    assert_same(batched, alone)
    # Chunked prefill: passes of at most --max-prefill-tokens (2048) packed in queue
    # order, the short prompts riding in the long one's last chunk; all three then
    # decode together.
    total = sum(len(r.prompt_ids) for r in requests)
    assert stats["peak_batch_size"] == 3 and stats["prefills"] == -(-total // 2048)


def test_a_full_cache_makes_admissions_wait_not_fail(
    bundle: ModelBundle, builder: QwenPromptBuilder
) -> None:
    requests = [
        request(builder, f"r{i}", TextItem(f"Hello {i}"), max_tokens=10 + 3 * i)
        for i in range(5)
    ]
    alone = solo(bundle, requests)

    async def together(engine: BatchingEngine) -> list[Outcome]:
        handles = [engine.submit(r) for r in requests]
        await wait_until(lambda: engine.stats()["decode_steps"] >= 1, "a step")
        assert engine.stats()["queue_depth"] == 3  # two slots: the rest wait
        return list(await asyncio.gather(*(collect(h) for h in handles)))

    with engine_for(bundle, max_batch_size=2) as engine:
        assert engine.runner is not None and engine.runner.capacity == 2
        outcomes = run(together(engine))
        stats = engine.stats()
    assert_same(outcomes, alone)
    assert stats["peak_batch_size"] == 2 and stats["failed"] == 0


def test_cache_slots_come_back_after_finish_cancel_timeout_and_fault(
    bundle: ModelBundle, builder: QwenPromptBuilder
) -> None:
    """Two slots; each way of leaving frees its slot at once: afterwards two new
    requests still run side by side and answer as they do alone."""
    long = request(builder, "long", TextItem("Say something"), max_tokens=400)
    probes = [request(builder, "p1", TextItem("hi"), max_tokens=15),
              request(builder, "p2", TextItem("Hello"), max_tokens=25)]
    alone = solo(bundle, probes)

    async def scenario(engine: BatchingEngine) -> list[Outcome]:
        # finished
        await collect(engine.submit(probes[0]))
        # cancelled while running
        cancelled = engine.submit(long)
        await wait_until(lambda: engine.stats()["batch_size"] == 1, "running")
        cancelled.cancel()
        await wait_until(lambda: engine.stats()["batch_size"] == 0, "freed")
        # timed out while running
        timed = engine.submit(replace(long, deadline=time.monotonic() + 0.2))
        outcome = await collect(timed)
        assert isinstance(outcome.end, Failed)
        assert isinstance(outcome.end.error, RequestTimeoutError)
        # a fault in the model call fails the running rows and frees their slots
        runner = engine.runner
        assert runner is not None
        original = runner.decode

        def broken(count: int, longest: int) -> torch.Tensor:
            raise RuntimeError("injected")

        runner.decode = broken  # type: ignore[method-assign]
        faulted = await collect(engine.submit(long))
        assert isinstance(faulted.end, Failed)
        runner.decode = original  # type: ignore[method-assign]
        await wait_until(lambda: engine.stats()["batch_size"] == 0, "freed")
        handles = [engine.submit(p) for p in probes]
        return list(await asyncio.gather(*(collect(h) for h in handles)))

    with engine_for(bundle, max_batch_size=2) as engine:
        outcomes = run(scenario(engine))
        stats = engine.stats()
    assert_same(outcomes, alone)
    assert stats["peak_batch_size"] == 2
    assert stats["cancelled"] == 1 and stats["failed"] == 2


def test_rows_take_blocks_as_they_grow_and_preemption_changes_no_answer(
    bundle: ModelBundle, builder: QwenPromptBuilder, audio: PreparedAudio
) -> None:
    """A cache of 16 blocks of 16 positions for 4 rows that need about 33: rows are
    admitted by free blocks, and when decoding runs out the latest row is preempted and
    prefilled again later (prompt, audio and answer so far). Greedy and seeded answers
    equal those of each request alone, and every block comes back."""
    requests = varied_requests(builder, audio)[:4]
    alone = solo(bundle, requests)
    small = CacheOptions(num_blocks=16)

    async def together(engine: BatchingEngine) -> list[Outcome]:
        handles = [engine.submit(r) for r in requests]
        return list(await asyncio.gather(*(collect(h) for h in handles)))

    with engine_for(bundle, max_batch_size=4, cache=small) as engine:
        outcomes = run(together(engine))
        stats = engine.stats()
    assert_same(outcomes, alone)
    assert stats["preemptions"] >= 1 and stats["failed"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] == 16


def test_chunked_prefill_answers_equal_whole_prompt_prefill(
    bundle: ModelBundle, builder: QwenPromptBuilder, audio: PreparedAudio
) -> None:
    """Prompts prefilled 7 tokens a pass (chunks crossing block edges and audio spans),
    interleaved with the decode steps of rows already running, answer as they do with
    one whole-prompt pass."""
    requests = varied_requests(builder, audio)
    alone = solo(bundle, requests)

    async def staggered(engine: BatchingEngine) -> list[Outcome]:
        handles = []
        for r in requests:
            handles.append(engine.submit(r))
            await asyncio.sleep(0.01)
        return list(await asyncio.gather(*(collect(h) for h in handles)))

    longest = max(len(r.prompt_ids) for r in requests)
    with engine_for(bundle, max_batch_size=8, cache=CacheOptions(max_prefill_tokens=7)) as engine:
        outcomes = run(staggered(engine))
        stats = engine.stats()
    assert_same(outcomes, alone)
    assert stats["prefills"] >= -(-longest // 7)


def test_a_stream_pauses_for_one_chunk_at_most_while_a_long_prompt_arrives(
    bundle: ModelBundle, builder: QwenPromptBuilder
) -> None:
    """While a 3000-token prompt is prefilled in 256-token chunks, a running row keeps
    getting a token after every chunk (counted in decode steps, not timed)."""
    running = request(builder, "running", TextItem("Say something"), max_tokens=200)
    long = request(builder, "long", TextItem(" ".join(f"w{i % 89}" for i in range(1200))),
                   max_tokens=4)
    chunks = -(-len(long.prompt_ids) // 256)

    async def scenario(engine: BatchingEngine) -> tuple[float, float, float]:
        first = engine.submit(running)
        await wait_until(lambda: engine.stats()["decode_steps"] >= 2, "running")
        steps_before = engine.stats()["decode_steps"]
        prefills_before = engine.stats()["prefills"]
        await collect(engine.submit(long))
        stats = engine.stats()
        first.cancel()
        return (stats["decode_steps"] - steps_before, stats["prefills"] - prefills_before,
                stats["completion_tokens"])

    options = CacheOptions(max_prefill_tokens=256)
    with engine_for(bundle, max_batch_size=4, cache=options) as engine:
        steps, prefills, _ = run(scenario(engine))
    assert prefills == chunks
    assert steps >= chunks  # a decode step of the running row after every chunk
def feature_requests(
    builder: QwenPromptBuilder, audio: PreparedAudio
) -> list[GenerationRequest]:
    """Rows with a JSON grammar, log probabilities, OpenAI penalties, logit_bias, seeded
    sampling and a plain greedy row."""
    from oai_audio_server.engine.grammar import canonical_schema
    from oai_audio_server.engine.types import GrammarSpec

    schema = GrammarSpec("json_schema", canonical_schema({
        "type": "object", "additionalProperties": False, "required": ["ok", "n"],
        "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}}}))
    return [
        request(builder, "plain", TextItem("Say something"), max_tokens=70),
        request(builder, "json", TextItem("Hello"), max_tokens=40, grammar=schema),
        request(builder, "json-sampled", AudioItem(audio), TextItem("What?"), max_tokens=40,
                grammar=schema, temperature=1.0, seed=4, logprobs=True, top_logprobs=3),
        request(builder, "object", TextItem("hi"), max_tokens=30,
                grammar=GrammarSpec("json_object")),
        request(builder, "penalised", TextItem("Hello"), max_tokens=50, presence_penalty=1.5,
                frequency_penalty=0.5, repetition_penalty=1.2, logprobs=True),
        request(builder, "biased", TextItem("Describe it"), max_tokens=45,
                logit_bias=((220, -100.0), (11, 3.0)), temperature=0.8, seed=9, top_k=40,
                top_p=0.9),
    ]


async def with_logprobs(handle: RequestHandle) -> tuple[Outcome, list[Any]]:
    parts: list[str] = []
    logprobs: list[Any] = []
    async for event in handle.events():
        if isinstance(event, TextDelta):
            parts.append(event.text)
            logprobs.extend(event.logprobs)
        else:
            return Outcome("".join(parts), event), logprobs
    raise AssertionError("no Finished")


def solo_with_logprobs(
    bundle: ModelBundle, requests: list[GenerationRequest]
) -> list[tuple[Outcome, list[Any]]]:
    """Each request alone (as solo()), with the log probabilities it was sent."""

    async def one_by_one(engine: BatchingEngine) -> list[tuple[Outcome, list[Any]]]:
        return [await with_logprobs(engine.submit(r)) for r in requests]

    with engine_for(bundle, max_batch_size=1) as engine:
        return run(one_by_one(engine))


async def together_with_logprobs(
    engine: BatchingEngine, requests: list[GenerationRequest]
) -> list[tuple[Outcome, list[Any]]]:
    handles = engine.submit_group(requests)
    return list(await asyncio.gather(*(with_logprobs(h) for h in handles)))


def assert_same_with_logprobs(
    got: list[tuple[Outcome, list[Any]]], expected: list[tuple[Outcome, list[Any]]]
) -> None:
    assert_same([o for o, _ in got], [o for o, _ in expected])
    for (_, mine), (_, theirs) in zip(got, expected, strict=True):
        assert [e.token_id for e in mine] == [e.token_id for e in theirs]
        assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(mine, theirs, strict=True))


def test_grammar_logprob_penalty_and_bias_rows_batched_equal_solo(
    bundle: ModelBundle, builder: QwenPromptBuilder, audio: PreparedAudio
) -> None:
    """Rows with a JSON grammar, log probabilities, OpenAI penalties and logit_bias
    decode in the same steps as plain rows, each exactly as alone (moves included: the
    rows finish at different steps and the last ones move into the gaps)."""
    import json

    requests = feature_requests(builder, audio)

    solo_results = solo_with_logprobs(bundle, requests)
    with engine_for(bundle, max_batch_size=8) as engine:
        batched_results = run(together_with_logprobs(engine, requests))
        assert engine.stats()["peak_batch_size"] == len(requests)
    assert_same_with_logprobs(batched_results, solo_results)
    by_name = {r.request_id: o for r, (o, _) in zip(requests, batched_results, strict=True)}
    for name in ("json", "json-sampled"):
        assert by_name[name].finished.reason == "stop", by_name[name]
        value = json.loads(by_name[name].text)
        assert isinstance(value["ok"], bool) and value["n"] in (1, 2, 3)
    if by_name["object"].finished.reason == "stop":
        assert isinstance(json.loads(by_name["object"].text), dict)
    assert by_name["object"].text.startswith("{")
    assert 220 not in by_name["biased"].finished.token_ids
    sampled_logprobs = batched_results[2][1]
    assert sampled_logprobs and all(len(e.top) == 3 for e in sampled_logprobs)
    assert batched_results[0][1] == []  # a row that did not ask gets none


@pytest.mark.parametrize("overlap", [False, True], ids=["lockstep", "overlapped"])
def test_preempted_rows_keep_their_sampler_state(
    bundle: ModelBundle, builder: QwenPromptBuilder, audio: PreparedAudio, overlap: bool
) -> None:
    """On a cache too small for the batch, grammar, penalty, logit_bias and seeded rows
    are preempted and recomputed: each answer (and its log probabilities) equals the
    answer alone, since a resumed row keeps its seed, its grammar matcher and its token
    counts. Overlapped: each step is queued before the previous one is read (the GPU's
    mode; lockstep while a grammar row runs), and the tokens queued for rows that
    finished or were preempted are dropped."""
    plain, json_row, json_sampled, json_object, penalised, biased = feature_requests(
        builder, audio)
    # The latest rows are preempted first: the sampled ones go last.
    free = request(builder, "sampled", TextItem("Tell me a story"), max_tokens=80,
                   temperature=1.0, seed=5)
    requests = [plain, json_row, json_object, penalised, json_sampled, biased, free]

    solo_results = solo_with_logprobs(bundle, requests)
    small = CacheOptions(num_blocks=20)
    with engine_for(bundle, max_batch_size=7, cache=small, overlap_steps=overlap) as engine:
        batched_results = run(together_with_logprobs(engine, requests))
        stats = engine.stats()
    assert stats["preemptions"] >= 1 and stats["failed"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] == 20
    assert_same_with_logprobs(batched_results, solo_results)
    tokens = sum(len(o.finished.token_ids) for o, _ in solo_results)
    assert stats["completion_tokens"] == tokens


def test_overlapped_steps_answer_as_lockstep_and_drop_the_extra_tokens(
    bundle: ModelBundle, builder: QwenPromptBuilder, audio: PreparedAudio
) -> None:
    """Greedy rows of different lengths, overlapped: the answers of lockstep, and a row
    that stops has its one queued token dropped (never sent, never counted)."""
    requests = varied_requests(builder, audio)
    alone = solo(bundle, requests)

    async def together(engine: BatchingEngine) -> list[Outcome]:
        handles = [engine.submit(r) for r in requests]
        return list(await asyncio.gather(*(collect(h) for h in handles)))

    with engine_for(bundle, max_batch_size=8, overlap_steps=True) as engine:
        outcomes = run(together(engine))
        stats = engine.stats()
    assert_same(outcomes, alone)
    assert stats["completion_tokens"] == sum(len(o.finished.token_ids) for o in alone)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def choices_of(first: GenerationRequest, count: int) -> list[GenerationRequest]:
    """``count`` choices of one prompt, as the chat service makes them for ``n``."""
    from oai_audio_server.engine.sampling import choice_seed

    return [first] + [
        replace(
            first, request_id=f"{first.request_id}-{index}", same_prompt_as_previous=True,
            sampling=replace(
                first.sampling, seed=choice_seed(first.sampling.seed or 0, index)),
        )
        for index in range(1, count)
    ]


@pytest.mark.parametrize("prompt_fills_its_blocks", [False, True])
def test_the_choices_of_one_prompt_share_one_prefill(
    bundle: ModelBundle, builder: QwenPromptBuilder, audio: PreparedAudio,
    prompt_fills_its_blocks: bool,
) -> None:
    """``n`` = 3 seeded choices: the prompt is prefilled once (counted once), the others
    take its blocks by reference (a partly filled last block copied), and each choice
    answers as the same request alone; every block comes back."""
    words = ["What", "can", "you", "hear?"]
    first = request(builder, "n", AudioItem(audio), TextItem(" ".join(words)),
                    max_tokens=24, temperature=1.0, seed=11)
    while (len(first.prompt_ids) % 16 == 0) != prompt_fills_its_blocks:
        words.append("more")
        first = request(builder, "n", AudioItem(audio), TextItem(" ".join(words)),
                        max_tokens=24, temperature=1.0, seed=11)
    choices = choices_of(first, 3)
    independent = [replace(c, same_prompt_as_previous=False) for c in choices]

    async def together(engine: BatchingEngine) -> list[Outcome]:
        handles = engine.submit_group(choices)
        return list(await asyncio.gather(*(collect(h) for h in handles)))

    alone = solo(bundle, independent)
    with engine_for(bundle, max_batch_size=4) as engine:
        outcomes = run(together(engine))
        stats = engine.stats()
    assert_same(outcomes, alone)
    assert len({tuple(o.finished.token_ids) for o in outcomes}) > 1  # seeds differ
    assert stats["prompt_tokens"] == len(first.prompt_ids)  # one prefill for three
    assert stats["prefills"] == 1
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_a_row_preempted_while_prefilling_starts_again_with_its_blocks(
    bundle: ModelBundle, builder: QwenPromptBuilder
) -> None:
    """A long prompt prefilled 4 tokens a pass on a 16-block cache while a long row
    decodes: when the decoding row needs a block and none is free, the prefilling row is
    preempted (it holds the latest blocks); it starts again later with blocks for its
    whole prompt and answers as it does alone."""
    running = request(builder, "running", TextItem(" ".join(f"a{i % 31}" for i in range(34))),
                      max_tokens=100)
    late = request(builder, "late", TextItem(" ".join(f"b{i % 37}" for i in range(30))),
                   max_tokens=20)
    assert blocks_needed_for(running) + blocks_needed_for(late) >= 14, "prompts too short"
    alone = solo(bundle, [running, late])

    async def both(engine: BatchingEngine) -> list[Outcome]:
        first = engine.submit(running)
        await wait_until(lambda: engine.stats()["decode_steps"] >= 1, "running")
        second = engine.submit(late)
        return list(await asyncio.gather(collect(first), collect(second)))

    options = CacheOptions(num_blocks=16, max_prefill_tokens=4)
    with engine_for(bundle, max_batch_size=2, cache=options) as engine:
        outcomes = run(both(engine))
        stats = engine.stats()
    assert stats["preemptions"] >= 1 and stats["failed"] == 0
    assert_same(outcomes, alone)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] == 16


def blocks_needed_for(generation: GenerationRequest) -> int:
    return -(-len(generation.prompt_ids) // 16)

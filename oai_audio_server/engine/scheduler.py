"""The batching engine: a single worker thread owns the model; requests queue for it.

Iteration-level batching on a slot KV cache: between two decode steps, waiting requests
are prefilled into free slots and join the running batch at their own lengths (no
padding, no recomputation); finished, cancelled and timed-out rows leave it at once and
free their slot. Which requests start is decided in ``admission.py``, the model runs in
``runner.py``, tokens are chosen for the whole batch on the device in ``sampling.py``,
and one copy of the chosen ids to the host per step drives detokenizing and stopping.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from oai_audio_server.engine.admission import Waiting, plan_admission
from oai_audio_server.engine.batch import Row
from oai_audio_server.engine.cache_plan import CacheOptions, plan_cache
from oai_audio_server.engine.detokenizer import IncrementalText
from oai_audio_server.engine.loader import ModelBundle
from oai_audio_server.engine.pacing import TextPacer
from oai_audio_server.engine.runner import ModelRunner
from oai_audio_server.engine.sampling import RowSampling, SamplingPlan, make_generator, sample
from oai_audio_server.engine.types import (
    Failed,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    TextDelta,
)
from oai_audio_server.errors import (
    APIError,
    ContextLengthExceededError,
    EngineError,
    NotReadyError,
    OverloadedError,
    RequestTimeoutError,
)
from oai_audio_server.heap import freeze_long_lived_objects

logger = logging.getLogger(__name__)

# Every counter exists from the start: stats() may read the dict from the event loop
# while the worker updates it, and a dict that never changes size is safe to copy.
COUNTERS = (
    "prefills",
    "decode_steps",
    "decode_time_us",  # wall time of decode steps (model, sampling, the one host copy)
    "prompt_tokens",
    "completion_tokens",
    "finished",
    "failed",
    "cancelled",
    "rejected_overloaded",
    "peak_batch_size",
)

T = TypeVar("T")


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


def _timeout_error(handle: RequestHandle, now: float, deadline: float) -> RequestTimeoutError:
    """Why the request ran out of time, and whether a retry can help: a request that
    spent most of its time waiting for the model may get through when the server is less
    busy; one that spent most of it generating would run out of time again."""
    generating = now - handle.admitted_at if handle.admitted_at is not None else 0.0
    if generating * 2 < deadline - handle.queued_at:
        return RequestTimeoutError(
            "the request timed out waiting for the model; the server is busy, retry later"
        )
    return RequestTimeoutError(
        f"the model did not finish within the server's request timeout (it generated for "
        f"{generating:.1f} s); a shorter input or answer finishes sooner",
        worth_retrying=False,
    )


class BatchingEngine:
    def __init__(
        self,
        load: Callable[[], ModelBundle],
        *,
        max_batch_size: int = 0,
        max_queue: int = 64,
        join_wait_steps: int = 0,
        cache: CacheOptions | None = None,
        on_admit: Callable[[list[RequestHandle]], None] | None = None,
        on_step: Callable[[], None] | None = None,
    ) -> None:
        """``max_batch_size`` 0 lets the KV-cache budget decide (see cache_plan.py).
        ``on_admit`` sees the requests leaving the queue; ``on_step`` runs after every
        worker step (both on the worker thread; for an engine in another process)."""
        self._load = load
        self._max_batch_size = max_batch_size
        self._max_queue = max_queue
        self._join_wait_steps = join_wait_steps
        self._cache_options = cache or CacheOptions()
        self._on_admit = on_admit
        self._on_step = on_step
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._cond = threading.Condition()
        self._bundle: ModelBundle | None = None
        self._runner: ModelRunner | None = None
        self._load_error: BaseException | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._batch_size = 0
        self._counters: collections.Counter[str] = collections.Counter(dict.fromkeys(COUNTERS, 0))
        self._outbox = Outbox()  # touched by the worker thread only
        self._plan: SamplingPlan | None = None  # of the current batch composition

    # ------------------------------------------------------------------ public

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="oas-engine", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._bundle = None
        self._runner = None

    @property
    def ready(self) -> bool:
        return self._bundle is not None and self._runner is not None and not self._stopping

    @property
    def load_error(self) -> BaseException | None:
        return self._load_error

    @property
    def bundle(self) -> ModelBundle:
        if self._bundle is None:
            raise NotReadyError("the model is still loading; retry shortly")
        return self._bundle

    @property
    def runner(self) -> ModelRunner | None:
        return self._runner

    @property
    def worker_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        return self.submit_group([request])[0]

    def submit_group(
        self, requests: list[GenerationRequest], sink: EventSink | None = None
    ) -> list[RequestHandle]:
        """Queue the generations of one client request (e.g. the 30 s segments of a long
        transcription) together: one admission decision against --max-queue, so a long
        file is never refused on an idle server for having more segments than slots.
        Events go to ``sink``; by default to the calling event loop."""
        if not self.ready:
            raise NotReadyError("the model is not ready; retry shortly")
        target = sink if sink is not None else LoopSink(asyncio.get_running_loop())
        handles = [RequestHandle(request, target) for request in requests]
        with self._cond:
            for handle in handles:
                handle.queued_at_step = self._counters["decode_steps"]
            if len(self._waiting) >= self._max_queue:
                self._sweep_waiting()  # a slot held by a gone client is free
            if len(self._waiting) >= self._max_queue:
                self._counters["rejected_overloaded"] += 1
                raise OverloadedError(
                    f"the server is busy ({self._max_queue} requests already waiting); "
                    "retry after the time given in Retry-After"
                )
            self._waiting.extend(handles)
            self._cond.notify_all()
        return handles

    def stats(self) -> dict[str, float]:
        return {
            "queue_depth": len(self._waiting),
            "batch_size": self._batch_size,
            **{name: float(value) for name, value in self._counters.items()},
        }

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        try:
            bundle = self._load()
            if bundle.device.type == "cuda":
                # Graph capture and every kernel of this thread on the model's GPU (a
                # capture stream on another device would record nothing).
                torch.cuda.set_device(bundle.device)
            with torch.inference_mode():  # the cache and the captured graphs
                runner = self._make_runner(bundle)
        except BaseException as exc:  # reported by /health; the thread ends
            logger.exception("model load failed")
            self._load_error = exc
            return
        self._bundle = bundle
        self._runner = runner
        freeze_long_lived_objects()  # a full collection would stall decode steps too
        logger.info(
            "model ready: %d sequences of up to %d tokens at once",
            runner.capacity, runner.cache.slot_len,
        )
        rows: list[Row] = []
        with torch.inference_mode():
            while True:
                rows = self._retire(runner, rows)  # gone rows free their slots first
                if not rows and self._batch_size:
                    # The last rows were cancelled between steps: report the empty batch
                    # before idling, not when the next request arrives.
                    self._batch_size = 0
                    self._after_step()
                with self._cond:
                    while not self._stopping and not rows and not self._waiting:
                        self._cond.wait(timeout=1.0)
                    if self._stopping:
                        break
                    try:
                        admitted = self._admit(runner, len(rows))
                    except Exception:  # never let the worker die with requests queued
                        logger.exception("admission failed")
                        admitted = []
                        if not rows:
                            self._cond.wait(timeout=1.0)  # no busy loop of failures
                try:
                    rows = self._step(bundle, runner, rows, admitted)
                except Exception as exc:
                    # Outside the guarded model calls (moving rows in the cache): fail
                    # what was in flight, keep the worker alive with an empty batch.
                    logger.exception("engine step failed")
                    live = [r.handle for r in rows if not r.finished]
                    unique = list({id(h): h for h in live + admitted}.values())
                    self._fail_after_fault(bundle, unique, exc)
                    rows = []
                    self._plan = None
                    runner.rows.clear_from(0)
                self._batch_size = len(rows)
                self._after_step()
        # shutting down: nobody will serve what is left
        for handle in list(self._waiting) + [r.handle for r in rows if not r.finished]:
            self._fail(handle, NotReadyError("the server is shutting down"))
        self._waiting.clear()
        self._outbox.flush()

    def _make_runner(self, bundle: ModelBundle) -> ModelRunner:
        from oai_audio_server.engine.kv_cache import SlotKVCache

        model = bundle.model
        if model is None:
            raise RuntimeError("the engine needs a bundle with the model's weights")
        options = self._cache_options
        plan = plan_cache(
            model.kv_layout, bundle.max_model_len, bundle.device, options, self._max_batch_size
        )
        cache = SlotKVCache(model.kv_layout, plan.slots, bundle.max_model_len, bundle.device)
        logger.info(
            "KV cache: %d slots of %d positions, %.1f MiB", plan.slots, bundle.max_model_len,
            cache.nbytes / (1024 * 1024),
        )
        return ModelRunner(
            model, cache, bundle.device, capacity=plan.max_batch_size,
            vocab_limit=bundle.vocab_limit, use_graphs=options.cuda_graphs,
        )

    def _step(
        self, bundle: ModelBundle, runner: ModelRunner, rows: list[Row],
        admitted: list[RequestHandle],
    ) -> list[Row]:
        """Prefill the admitted requests into the next free slots, then one decode step
        for every row."""
        if admitted:
            joined = self._guarded(bundle, admitted, self._prefill, bundle, runner, admitted,
                                   len(rows))
            if joined is not None:
                rows = rows + joined
                self._plan = None
                self._note_peak(len(rows))
            self._outbox.flush()  # first tokens out now: time to first token
        rows = self._retire(runner, rows)
        if rows:
            live = [row.handle for row in rows]
            stepped = self._guarded(bundle, live, self._decode_step, runner, rows)
            if stepped is None:  # every row failed; their cache contents are unknown
                rows = []
                self._plan = None
                runner.rows.clear_from(0)
            else:
                rows = self._retire(runner, rows)
        return rows

    def _after_step(self) -> None:
        try:
            self._outbox.flush()
            if self._on_step is not None:
                self._on_step()
        except Exception:  # a sink that cannot deliver must not end the worker
            logger.exception("delivering events failed")

    def _note_peak(self, size: int) -> None:
        """Before the step's events go out (a reader may check the stats on the reply):
        the batch is largest now, before rows that finished with their first token leave."""
        self._counters["peak_batch_size"] = max(self._counters["peak_batch_size"], size)

    def _guarded(
        self,
        bundle: ModelBundle,
        handles: list[RequestHandle],
        work: Callable[..., T],
        *args: Any,
    ) -> T | None:
        """Run one model call; if it fails, fail only the requests it was for (a bad
        newcomer never takes the running batch down) and keep serving."""
        try:
            return work(*args)
        except Exception as exc:
            logger.exception("generation failed")
            self._fail_after_fault(bundle, handles, exc)
            return None

    def _fail_after_fault(
        self, bundle: ModelBundle, handles: list[RequestHandle], exc: Exception
    ) -> None:
        error = EngineError(f"generation failed: {type(exc).__name__}: {exc}")
        for handle in handles:
            self._fail(handle, error)
        if bundle.device.type == "cuda":
            torch.cuda.empty_cache()  # what the failed call allocated

    def _fail(self, handle: RequestHandle, error: APIError) -> None:
        self._counters["failed"] += 1
        self._emit(handle, Failed(error))

    def _emit(self, handle: RequestHandle, event: GenerationEvent) -> None:
        if threading.current_thread() is self._thread:
            self._outbox.add(handle, event)  # delivered when the step ends
        else:  # submit() sweeping the queue, on the event loop's thread
            handle.emit(event)

    def _sweep_waiting(self) -> None:
        """Drop cancelled and timed-out requests from anywhere in the queue, so a client
        that left or ran out of time neither holds a queue slot nor waits for its error
        until a full batch drains. Caller holds the lock."""
        now = time.monotonic()
        keep = [h for h in self._waiting if not self._gone(h, now)]
        if len(keep) != len(self._waiting):
            self._waiting.clear()
            self._waiting.extend(keep)

    def _gone(self, handle: RequestHandle, now: float) -> bool:
        """Whether a request is cancelled or past its deadline (then failed here)."""
        if handle.cancelled:
            self._counters["cancelled"] += 1
            return True
        deadline = handle.request.deadline
        if deadline is not None and now > deadline:
            self._fail(handle, _timeout_error(handle, now, deadline))
            return True
        return False

    def _too_long(self, handle: RequestHandle, slot_len: int) -> bool:
        """A request whose prompt and answer cannot fit one cache slot fails (the
        services refuse such requests before they reach the engine)."""
        request = handle.request
        needed = len(request.prompt_ids) + request.sampling.max_tokens
        if needed <= slot_len and request.prompt_ids:
            return False
        self._fail(handle, ContextLengthExceededError(
            f"the prompt ({len(request.prompt_ids)} tokens) and max_tokens "
            f"({request.sampling.max_tokens}) exceed the {slot_len}-token limit per sequence"
        ))
        return True

    def _admit(self, runner: ModelRunner, running: int) -> list[RequestHandle]:
        """Pop the waiting requests that start now (see admission.py). Caller holds the
        lock."""
        self._sweep_waiting()
        if not self._waiting or running >= runner.capacity:
            return []  # the usual decode step: no per-request summaries to build
        slot_len = runner.cache.slot_len
        for handle in [h for h in self._waiting if self._too_long(h, slot_len)]:
            self._waiting.remove(handle)
        steps = self._counters["decode_steps"]
        queued = list(self._waiting)
        chosen = plan_admission(
            [Waiting(len(h.request.prompt_ids), steps - h.queued_at_step) for h in queued],
            running=running,
            capacity=runner.capacity,
            max_prefill_tokens=self._cache_options.max_prefill_tokens,
            join_wait_steps=self._join_wait_steps,
        )
        admitted = [queued[i] for i in chosen]
        now = time.monotonic()
        for handle in admitted:
            self._waiting.remove(handle)
            handle.admitted_at = now
        if admitted and self._on_admit is not None:
            self._on_admit(admitted)
        return admitted

    def _new_row(self, bundle: ModelBundle, handle: RequestHandle) -> Row:
        request = handle.request
        sampling = request.sampling
        seen = None
        if sampling.repetition_penalty != 1.0:
            ids = torch.tensor(request.prompt_ids, dtype=torch.long)
            seen = ids[ids < bundle.vocab_limit].to(bundle.device)
        return Row(
            handle=handle,
            text=IncrementalText(bundle.token_bytes, stop=sampling.stop,
                                 strip=request.strip_whitespace),
            sampling=RowSampling(sampling, make_generator(sampling, bundle.device), seen),
            pacer=TextPacer(request.text_interval),
            position=len(request.prompt_ids),
        )

    def _prefill(
        self, bundle: ModelBundle, runner: ModelRunner, handles: list[RequestHandle],
        first_slot: int,
    ) -> list[Row]:
        """One forward over the newcomers' whole prompts (their audio encoded together),
        written into slots ``first_slot..``; their first tokens are sampled at once."""
        prompts = [h.request.prompt_ids for h in handles]
        logits, state = runner.prefill(prompts, [h.request.audio for h in handles], first_slot)
        rows = [self._new_row(bundle, h) for h in handles]
        samplers = [row.sampling for row in rows]
        chosen = sample(logits, samplers, SamplingPlan(samplers, bundle.device))
        runner.rows.load(first_slot, chosen, [row.position for row in rows], state)
        self._counters["prefills"] += 1
        self._counters["prompt_tokens"] += sum(len(p) for p in prompts)
        for index, (row, token) in enumerate(zip(rows, chosen.tolist(), strict=True)):
            self._accept(bundle, row, token, chosen[index : index + 1])
        return rows

    def _decode_step(self, runner: ModelRunner, rows: list[Row]) -> list[Row]:
        bundle = self.bundle
        started = time.perf_counter()
        count = len(rows)
        samplers = [row.sampling for row in rows]
        if self._plan is None:
            # Built before the step is queued: its host-to-device copies then do not wait
            # for the forward pass.
            self._plan = SamplingPlan(samplers, bundle.device)
        logits = runner.decode(count, max(row.position for row in rows))
        chosen = sample(logits, samplers, self._plan)
        runner.rows.advance(count, chosen)
        tokens = chosen.tolist()  # the step's one wait for the device
        self._counters["decode_steps"] += 1
        self._counters["decode_time_us"] += int((time.perf_counter() - started) * 1e6)
        for index, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            row.position += 1
            self._accept(bundle, row, token, chosen[index : index + 1])
        return rows

    def _accept(self, bundle: ModelBundle, row: Row, token: int, chosen: torch.Tensor) -> None:
        """``chosen``: the same id as a one-element tensor on the device."""
        row.generated.append(token)
        self._counters["completion_tokens"] += 1
        if token in bundle.stop_token_ids:
            self._finish(row, "stop")
            return
        self._emit_text(row, row.pacer.push(row.text.push(token), time.monotonic()))
        if row.text.stopped:
            self._finish(row, "stop")
        elif len(row.generated) >= row.handle.request.sampling.max_tokens:
            self._finish(row, "length")
        elif row.sampling.seen is not None:
            # The penalty covers the answer so far; the id stays on the device.
            row.sampling.seen = torch.cat([row.sampling.seen, chosen])

    def _emit_text(self, row: Row, text: str) -> None:
        if text:
            self._emit(row.handle, TextDelta(text))

    def _finish(self, row: Row, reason: FinishReason) -> None:
        tail = row.pacer.drain() + row.text.finish()
        if tail:
            self._emit(row.handle, TextDelta(tail))
        row.finished = True
        self._counters["finished"] += 1
        self._emit(
            row.handle,
            Finished(
                reason=reason,
                prompt_tokens=len(row.handle.request.prompt_ids),
                completion_tokens=len(row.generated),
                token_ids=list(row.generated),
            ),
        )

    def _retire(self, runner: ModelRunner, rows: list[Row]) -> list[Row]:
        """Drop finished, cancelled and timed-out rows; the last rows move into the
        freed slots, so the batch keeps filling slots 0..n-1."""
        if not rows:
            return rows
        now = time.monotonic()
        leaving = {id(r) for r in rows if r.finished or self._gone(r.handle, now)}
        if not leaving:
            return rows
        live = list(rows)
        index = 0
        while index < len(live):
            if id(live[index]) not in leaving:
                index += 1
                continue
            while live and id(live[-1]) in leaving:
                live.pop()
            if index >= len(live):
                break
            last = len(live) - 1
            runner.move(last, index, live[last].position)
            live[index] = live.pop()
            index += 1
        runner.rows.clear_from(len(live))
        self._plan = None
        return live

"""The batching engine: a single worker thread owns the model; requests queue for it.

Iteration-level batching: between two decode steps, waiting requests are prefilled and
join the running batch; finished or cancelled rows leave it at once. A waiting request
joins only when doing so keeps every row's answer identical to running it alone (see
``batch.py``): its prompt fits in the current cache length, and no row can grow past the
length where the model's rotary scaling switches on. Otherwise it waits for the batch
to drain (the queue is first-in first-out, so nothing starves).
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

from oai_audio_server.engine.admission import WAIT, Plan, Running, Waiting, plan_fresh, plan_running
from oai_audio_server.engine.batch import Batch, Row
from oai_audio_server.engine.detokenizer import IncrementalText
from oai_audio_server.engine.loader import ModelBundle
from oai_audio_server.engine.pacing import TextPacer
from oai_audio_server.engine.sampling import make_generator, next_token
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
    EngineError,
    NotReadyError,
    OverloadedError,
    RequestTimeoutError,
)

logger = logging.getLogger(__name__)

# Every counter exists from the start: stats() may read the dict from the event loop
# while the worker updates it, and a dict that never changes size is safe to copy.
COUNTERS = (
    "prefills",
    "rebuilds",
    "recomputed_tokens",
    "decode_steps",
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


def _audio_marker_ids(tokenizer: Any) -> frozenset[int]:
    """Token ids that a forward pass without a cache reads as audio span markers (the
    remote code pairs each audio start id with the id after it): a row that generated
    one cannot be re-prefilled from its answer."""
    start = getattr(tokenizer, "audio_start_id", None)
    if start is None:
        return frozenset()
    end = getattr(tokenizer, "audio_end_id", start + 1)
    return frozenset({int(start), int(start) + 1, int(end)})


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
        max_batch_size: int = 8,
        max_queue: int = 64,
        join_wait_steps: int = 0,
        on_admit: Callable[[list[RequestHandle]], None] | None = None,
        on_step: Callable[[], None] | None = None,
    ) -> None:
        """``on_admit`` sees the requests leaving the queue; ``on_step`` runs after every
        worker step (both on the worker thread; for an engine in another process)."""
        self._load = load
        self._max_batch_size = max_batch_size
        self._max_queue = max_queue
        self._join_wait_steps = join_wait_steps
        self._on_admit = on_admit
        self._on_step = on_step
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._cond = threading.Condition()
        self._bundle: ModelBundle | None = None
        self._load_error: BaseException | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._batch_size = 0
        self._counters: collections.Counter[str] = collections.Counter(dict.fromkeys(COUNTERS, 0))
        self._outbox = Outbox()  # touched by the worker thread only
        self._audio_markers: frozenset[int] = frozenset()

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

    @property
    def ready(self) -> bool:
        return self._bundle is not None and not self._stopping

    @property
    def load_error(self) -> BaseException | None:
        return self._load_error

    @property
    def bundle(self) -> ModelBundle:
        if self._bundle is None:
            raise NotReadyError("the model is still loading; retry shortly")
        return self._bundle

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
        except BaseException as exc:  # reported by /health; the thread ends
            logger.exception("model load failed")
            self._load_error = exc
            return
        self._bundle = bundle
        logger.info("model ready")
        batch: Batch | None = None
        self._audio_markers = _audio_marker_ids(bundle.tokenizer)
        with torch.inference_mode():
            while True:
                batch = self._retire(batch)  # gone rows neither take room nor get rebuilt
                if batch is None and self._batch_size:
                    # The last rows were cancelled between steps: report the empty batch
                    # before idling, not when the next request arrives.
                    self._batch_size = 0
                    self._after_step()
                with self._cond:
                    while not self._stopping and batch is None and not self._waiting:
                        self._cond.wait(timeout=1.0)
                    if self._stopping:
                        break
                    try:
                        plan, admitted = self._admit(batch, bundle)
                    except Exception:  # never let the worker die with requests queued
                        logger.exception("admission failed")
                        plan, admitted = WAIT, []
                        if batch is None:
                            self._cond.wait(timeout=1.0)  # no busy loop of failures
                try:
                    batch = self._step(bundle, batch, plan, admitted)
                except Exception as exc:
                    # Outside the guarded model calls (joining or filtering the cache can
                    # run out of memory): fail what was in flight, keep the worker alive.
                    logger.exception("engine step failed")
                    rows = [r.handle for r in (batch.rows if batch else []) if not r.finished]
                    unique = list({id(h): h for h in rows + admitted}.values())
                    self._fail_after_fault(bundle, unique, exc)
                    batch = None
                self._batch_size = len(batch.rows) if batch else 0
                self._after_step()
        # shutting down: nobody will serve what is left
        for handle in list(self._waiting) + [r.handle for r in (batch.rows if batch else [])]:
            self._fail(handle, NotReadyError("the server is shutting down"))
        self._waiting.clear()
        self._outbox.flush()

    def _step(
        self, bundle: ModelBundle, batch: Batch | None, plan: Plan, admitted: list[RequestHandle]
    ) -> Batch | None:
        """Start the admitted requests (see admission.py), then one decode step for all."""
        if plan.how == "rebuild" and batch is not None:
            # Only the newcomers fail if it does not work: the running batch and its
            # cache are untouched until the forward pass has succeeded.
            rebuilt = self._guarded(bundle, admitted, self._rebuild, bundle, batch, admitted)
            if rebuilt is not None:
                batch = rebuilt
                self._note_peak(batch)
            self._outbox.flush()
        elif admitted:
            joined = self._guarded(bundle, admitted, self._prefill, bundle, admitted, batch)
            if joined is not None:
                batch = joined if batch is None else batch.extend(joined)
                self._note_peak(batch)
            self._outbox.flush()  # first tokens out now: time to first token
        batch = self._retire(batch)
        if batch is not None:
            live = [row.handle for row in batch.rows]
            stepped = self._guarded(bundle, live, self._decode_step, bundle, batch)
            batch = self._retire(batch) if stepped is not None else None
        return batch

    def _after_step(self) -> None:
        try:
            self._outbox.flush()
            if self._on_step is not None:
                self._on_step()
        except Exception:  # a sink that cannot deliver must not end the worker
            logger.exception("delivering events failed")

    def _note_peak(self, batch: Batch) -> None:
        """Before the step's events go out (a reader may check the stats on the reply):
        the batch is largest now, before rows that finished with their first token leave."""
        peak = max(self._counters["peak_batch_size"], len(batch.rows))
        self._counters["peak_batch_size"] = peak

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

    def _admit(self, batch: Batch | None, bundle: ModelBundle) -> tuple[Plan, list[RequestHandle]]:
        """Pop the waiting requests that start now, and how (see admission.py). Caller
        holds the lock."""
        self._sweep_waiting()
        if not self._waiting or (batch is not None and len(batch.rows) >= self._max_batch_size):
            return WAIT, []  # the usual decode step: no per-row summaries to build
        limit = bundle.exact_batch_len
        steps = self._counters["decode_steps"]
        waiting = [
            Waiting(
                len(h.request.prompt_ids),
                h.request.sampling.max_tokens,
                waited_steps=steps - h.queued_at_step,
            )
            for h in self._waiting
        ]
        if batch is None:
            plan = plan_fresh(waiting, self._max_batch_size, limit)
        else:
            rows = [
                Running(
                    len(r.handle.request.prompt_ids),
                    r.handle.request.sampling.max_tokens,
                    len(r.generated),
                    recomputable=self._audio_markers.isdisjoint(r.generated),
                )
                for r in batch.rows
            ]
            plan = plan_running(
                rows, batch.length, waiting, self._max_batch_size, limit, self._join_wait_steps
            )
        queued = list(self._waiting)
        admitted = [queued[i] for i in plan.admit]
        now = time.monotonic()
        for handle in admitted:
            self._waiting.remove(handle)
            handle.admitted_at = now
        if admitted and self._on_admit is not None:
            self._on_admit(admitted)
        return plan, admitted

    def _audio_info(self, handles: list[RequestHandle]) -> dict[str, Any] | None:
        segments = [segment for h in handles for segment in h.request.audio]
        if not segments:
            return None
        # The same shapes the official tokenizer.process_audio returns, in prompt order.
        return {
            "input_audios": torch.stack([s.mel for s in segments]),
            "input_audio_lengths": torch.tensor(
                [[s.length_after_cnn, s.token_count] for s in segments], dtype=torch.int32
            ),
            "audio_span_tokens": [s.token_count + 2 for s in segments],
            "audio_urls": [f"audio-{i}" for i in range(len(segments))],
        }

    def _forward_last_logits(self, bundle: ModelBundle, **inputs: Any) -> tuple[torch.Tensor, Any]:
        """Logits of the last position only: the full [batch, seq, vocab] tensor of a
        long audio prompt would cost gigabytes for nothing."""
        model = bundle.model
        if hasattr(model, "transformer") and hasattr(model, "lm_head"):
            out = model.transformer(**inputs, use_cache=True, return_dict=True)
            logits = model.lm_head(out.last_hidden_state[:, -1, :])
        else:
            out = model(**inputs, use_cache=True, return_dict=True)
            logits = out.logits[:, -1, :]
        return logits[:, : bundle.vocab_limit].float(), out.past_key_values

    def _forward_prompts(
        self,
        bundle: ModelBundle,
        sequences: list[list[int]],
        handles: list[RequestHandle],
        length: int,
    ) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """One forward over whole token sequences, each left-padded to ``length``."""
        input_ids = torch.full((len(sequences), length), bundle.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for i, tokens in enumerate(sequences):
            input_ids[i, length - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
            mask[i, length - len(tokens) :] = 1
        input_ids = input_ids.to(bundle.device)
        mask = mask.to(bundle.device)
        logits, past = self._forward_last_logits(
            bundle,
            input_ids=input_ids,
            attention_mask=mask,
            past_key_values=None,
            audio_info=self._audio_info(handles),
        )
        return logits, past, mask

    def _new_row(self, bundle: ModelBundle, handle: RequestHandle) -> Row:
        sampling = handle.request.sampling
        return Row(
            handle=handle,
            text=IncrementalText(
                bundle.token_bytes, stop=sampling.stop, strip=handle.request.strip_whitespace
            ),
            generator=make_generator(sampling, bundle.device),
            pacer=TextPacer(handle.request.text_interval),
        )

    def _prefill(
        self, bundle: ModelBundle, handles: list[RequestHandle], batch: Batch | None
    ) -> Batch:
        """New rows, padded to the running batch's cache length (or their longest prompt)."""
        return self._start_rows(bundle, [], handles, batch.length if batch else None)

    def _rebuild(
        self, bundle: ModelBundle, batch: Batch, handles: list[RequestHandle]
    ) -> Batch:
        """The running rows re-prefilled from their prompt and answer so far (the token
        sampled last is fed here, so this forward is also their decode step), together
        with the newcomers, each padded only to the longest of them."""
        return self._start_rows(bundle, batch.rows, handles, None)

    def _start_rows(
        self,
        bundle: ModelBundle,
        running: list[Row],
        handles: list[RequestHandle],
        length: int | None,
    ) -> Batch:
        """One forward over whole sequences (running rows' prompt and answer, then the
        newcomers' prompts), left-padded to ``length`` or the longest of them."""
        recomputed = [r.handle.request.prompt_ids + r.generated for r in running]
        prompts = [h.request.prompt_ids for h in handles]
        sequences = recomputed + prompts
        everyone = [r.handle for r in running] + handles
        logits, past, mask = self._forward_prompts(
            bundle, sequences, everyone, length or max(len(s) for s in sequences)
        )
        rows = running + [self._new_row(bundle, h) for h in handles]
        self._counters["prefills"] += 1
        if running:
            self._counters["rebuilds"] += 1
            self._counters["recomputed_tokens"] += sum(len(s) for s in recomputed)
        self._counters["prompt_tokens"] += sum(len(p) for p in prompts)
        self._sample_all(bundle, rows, logits)
        return Batch(rows=rows, past=past, attention_mask=mask)

    def _decode_step(self, bundle: ModelBundle, batch: Batch) -> Batch:
        tokens = [row.pending_token for row in batch.rows]
        input_ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=bundle.device)
        ones = torch.ones((len(tokens), 1), dtype=batch.attention_mask.dtype, device=bundle.device)
        batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=1)
        logits, batch.past = self._forward_last_logits(
            bundle,
            input_ids=input_ids,
            attention_mask=batch.attention_mask,
            past_key_values=batch.past,
        )
        self._counters["decode_steps"] += 1
        self._sample_all(bundle, batch.rows, logits)
        return batch

    def _sample_all(self, bundle: ModelBundle, rows: list[Row], logits: torch.Tensor) -> None:
        for i, row in enumerate(rows):
            request = row.handle.request
            sampling = request.sampling
            seen = None
            if sampling.repetition_penalty != 1.0:
                seen = torch.tensor(
                    request.prompt_ids + row.generated, dtype=torch.long, device=logits.device
                )
                seen = seen[seen < logits.shape[1]]
            try:
                token = next_token(logits[i], sampling, seen_ids=seen, generator=row.generator)
            except Exception as exc:  # this row's parameters: its own failure only
                logger.exception("sampling failed for %s", request.request_id)
                row.finished = True
                self._fail(row.handle, EngineError(f"sampling failed: {exc}"))
                continue
            self._accept(bundle, row, token)

    def _accept(self, bundle: ModelBundle, row: Row, token: int) -> None:
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
        else:
            row.pending_token = token

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

    def _retire(self, batch: Batch | None) -> Batch | None:
        """Drop finished, cancelled and timed-out rows from the batch."""
        if batch is None:
            return None
        now = time.monotonic()
        keep = [
            i
            for i, row in enumerate(batch.rows)
            if not row.finished and not self._gone(row.handle, now)
        ]
        return batch.keep(keep) if keep else None

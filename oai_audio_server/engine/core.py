"""The batching engine: a single worker thread owns the model; requests queue for it.

Iteration-level batching on a paged KV cache. Each iteration of the worker's loop:

1. rows that finished, were cancelled or ran out of time leave and free their blocks;
2. waiting requests start while a row and blocks for their prompt are free
   (``admission.py``); preempted rows come back first;
3. one prefill pass of at most ``--max-prefill-tokens`` prompt tokens, taken from the
   rows still prefilling in queue order (a long prompt is prefilled in chunks, so the
   running rows pause for one chunk at most); rows whose prompt is complete sample their
   first token and join the decoding rows;
4. one decode step for every decoding row. A row that crosses into a new block takes
   one; when none is free the most recently started row is preempted: its blocks are
   freed and it is prefilled again later (its prompt and answer so far), so the cache
   never runs out of memory and no answer changes.

The model runs in ``runner.py``, tokens are chosen for the whole batch on the device in
``sampling.py``, and one copy of the chosen ids to the host per step drives detokenizing
and stopping.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from oai_audio_server.engine.admission import Waiting, plan_admission
from oai_audio_server.engine.batch import Row
from oai_audio_server.engine.cache_plan import CacheOptions, pick_attention_backend, plan_cache
from oai_audio_server.engine.detokenizer import IncrementalText
from oai_audio_server.engine.handles import EventSink, LoopSink, Outbox, RequestHandle
from oai_audio_server.engine.loader import ModelBundle
from oai_audio_server.engine.pacing import TextPacer
from oai_audio_server.engine.prefix import PrefixCache, model_fingerprint
from oai_audio_server.engine.runner import ModelRunner, PrefillWork
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
from oai_audio_server.models.block_manager import BlockManager
from oai_audio_server.models.kv_cache import PagedKVCache

logger = logging.getLogger(__name__)

# Every counter exists from the start: stats() may read the dict from the event loop
# while the worker updates it, and a dict that never changes size is safe to copy.
COUNTERS = (
    "prefills",  # prefill passes (each one chunk of one or more prompts)
    "decode_steps",
    "decode_time_us",  # from one decode step's start to the next one's, while busy
    "prompt_tokens",
    "completion_tokens",
    "finished",
    "failed",
    "cancelled",
    "rejected_overloaded",
    "peak_batch_size",
    "preemptions",
)

# Prefix caching (engine/prefix.py): blocks holding a cached prefix, and the prompt
# tokens of new requests taken from the cache (hits) or computed (misses).
PREFIX_STATS = ("kv_blocks_cached", "prefix_cache_hit_tokens", "prefix_cache_miss_tokens")

T = TypeVar("T")


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
        """``max_batch_size`` 0 = auto (see cache_plan.py). ``on_admit`` sees the
        requests leaving the queue; ``on_step`` runs after every worker step (both on the
        worker thread; for an engine in another process)."""
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
        self._blocks: BlockManager | None = None
        self._prefix: PrefixCache | None = None
        self._load_error: BaseException | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._batch_size = 0
        self._counters: collections.Counter[str] = collections.Counter(dict.fromkeys(COUNTERS, 0))
        self._outbox = Outbox()  # touched by the worker thread only
        self._plan: SamplingPlan | None = None  # of the current decoding rows
        # Worker-thread state: rows decoding (device rows 0..n-1, in order), rows still
        # prefilling, and rows preempted (no blocks; they start again first).
        self._decoding: list[Row] = []
        self._prefilling: list[Row] = []
        self._preempted: collections.deque[Row] = collections.deque()
        self._last_step_start: float | None = None

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
    def blocks(self) -> BlockManager | None:
        return self._blocks

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
        file is never refused on an idle server for having more segments than rows.
        Events go to ``sink``; by default to the calling event loop."""
        if not self.ready:
            raise NotReadyError("the model is not ready; retry shortly")
        target = sink if sink is not None else LoopSink(asyncio.get_running_loop())
        handles = [RequestHandle(request, target) for request in requests]
        with self._cond:
            for handle in handles:
                handle.queued_at_step = self._counters["decode_steps"]
            if len(self._waiting) >= self._max_queue:
                self._sweep_waiting()  # a place held by a gone client is free
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
        blocks = self._blocks
        return {
            "queue_depth": len(self._waiting),
            "batch_size": self._batch_size,
            "kv_blocks_total": float(blocks.num_blocks if blocks else 0),
            "kv_blocks_free": float(blocks.free_blocks if blocks else 0),
            **self._prefix_stats(),
            **{name: float(value) for name, value in self._counters.items()},
        }

    def _prefix_stats(self) -> dict[str, float]:
        prefix = self._prefix
        if prefix is None:
            return dict.fromkeys(PREFIX_STATS, 0.0)
        return {
            "kv_blocks_cached": float(prefix.blocks.cached_blocks),
            "prefix_cache_hit_tokens": float(prefix.hit_tokens),
            "prefix_cache_miss_tokens": float(prefix.miss_tokens),
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
            "model ready: up to %d sequences at once, %d KV blocks of %d positions "
            "(%d positions), %s attention",
            runner.capacity, runner.cache.num_blocks - 1, runner.block_size,
            (runner.cache.num_blocks - 1) * runner.block_size, runner.backend,
        )
        with torch.inference_mode():
            while True:
                self._retire()  # gone rows free their blocks first
                if self._idle() and self._batch_size:
                    # The last rows were cancelled between steps: report the empty batch
                    # before idling, not when the next request arrives.
                    self._batch_size = 0
                    self._after_step()
                with self._cond:
                    while not self._stopping and self._idle() and not self._waiting:
                        self._last_step_start = None
                        self._cond.wait(timeout=1.0)
                    if self._stopping:
                        break
                    try:
                        self._admit(bundle, runner)
                    except Exception:  # never let the worker die with requests queued
                        logger.exception("admission failed")
                        if self._idle():
                            self._cond.wait(timeout=1.0)  # no busy loop of failures
                try:
                    self._step(bundle, runner)
                except Exception as exc:
                    # Outside the guarded model calls (bookkeeping): fail what was in
                    # flight, keep the worker alive with an empty batch.
                    logger.exception("engine step failed")
                    self._fail_rows(bundle, self._decoding + self._prefilling, exc)
                self._batch_size = len(self._decoding) + len(self._prefilling)
                self._after_step()
        # shutting down: nobody will serve what is left
        stopping = NotReadyError("the server is shutting down")
        rows = self._decoding + self._prefilling + list(self._preempted)
        for handle in list(self._waiting) + [r.handle for r in rows if not r.finished]:
            self._fail(handle, stopping)
        self._waiting.clear()
        self._outbox.flush()

    def _idle(self) -> bool:
        return not (self._decoding or self._prefilling or self._preempted)

    def _make_runner(self, bundle: ModelBundle) -> ModelRunner:
        model = bundle.model
        if model is None:
            raise RuntimeError("the engine needs a bundle with the model's weights")
        options = self._cache_options
        backend = pick_attention_backend(options.attention_backend, bundle.device)
        plan = plan_cache(
            model.kv_layout, bundle.max_model_len, bundle.device, options, self._max_batch_size
        )
        # Block 0 is never handed out: padding rows of a captured graph write there.
        cache = PagedKVCache(model.kv_layout, plan.num_blocks + 1, plan.block_size, bundle.device)
        self._blocks = BlockManager(plan.num_blocks + 1, plan.block_size, reserved=1)
        self._prefix = PrefixCache(
            self._blocks, model,
            model_fingerprint(bundle.family, str(bundle.model_dir), bundle.dtype,
                              plan.block_size),
            enabled=options.prefix_caching,
        )
        logger.info(
            "KV cache: %d blocks of %d positions, %.1f MiB", plan.num_blocks, plan.block_size,
            cache.nbytes / (1024 * 1024),
        )
        return ModelRunner(
            model, cache, bundle.device, capacity=plan.max_batch_size,
            max_len=plan.max_len, vocab_limit=bundle.vocab_limit,
            use_graphs=options.cuda_graphs, backend=backend,
        )

    def _step(self, bundle: ModelBundle, runner: ModelRunner) -> None:
        """One prefill pass (if any row is prefilling), then one decode step."""
        if self._prefilling:
            self._prefill_pass(bundle, runner)
            self._retire()
            # Before the events go out: a reader may check the stats on the reply.
            self._batch_size = len(self._decoding) + len(self._prefilling)
            self._outbox.flush()  # first tokens out now: time to first token
        if self._decoding:
            self._decode_pass(bundle, runner)
            self._retire()

    def _after_step(self) -> None:
        try:
            self._outbox.flush()
            if self._on_step is not None:
                self._on_step()
        except Exception:  # a sink that cannot deliver must not end the worker
            logger.exception("delivering events failed")

    def _guarded(
        self, bundle: ModelBundle, rows: Sequence[Row], work: Callable[..., T], *args: Any,
    ) -> T | None:
        """Run one model call; if it fails, fail only the rows it was for (a bad
        newcomer never takes the running batch down) and keep serving."""
        try:
            return work(*args)
        except Exception as exc:
            logger.exception("generation failed")
            self._fail_rows(bundle, rows, exc)
            return None

    def _fail_rows(self, bundle: ModelBundle, rows: Sequence[Row], exc: Exception) -> None:
        """Fail these rows and free what they hold (their blocks' contents are unknown)."""
        error = EngineError(f"generation failed: {type(exc).__name__}: {exc}")
        failing = {id(row) for row in rows}
        for row in rows:
            if not row.finished:
                row.finished = True
                self._fail(row.handle, error)
            self._release(row, failed=True)
        self._decoding = [r for r in self._decoding if id(r) not in failing]
        self._prefilling = [r for r in self._prefilling if id(r) not in failing]
        self._plan = None
        if self._runner is not None:
            rows_left = self._decoding
            for index, row in enumerate(rows_left):
                self._reload(index, row)
            self._runner.rows.clear_from(len(rows_left))
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
        that left or ran out of time neither holds a queue place nor waits for its error
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

    def _too_long(self, handle: RequestHandle, max_len: int) -> bool:
        """A request whose prompt and answer cannot fit one sequence fails (the services
        refuse such requests before they reach the engine)."""
        request = handle.request
        needed = len(request.prompt_ids) + request.sampling.max_tokens
        if needed <= max_len and request.prompt_ids:
            return False
        self._fail(handle, ContextLengthExceededError(
            f"the prompt ({len(request.prompt_ids)} tokens) and max_tokens "
            f"({request.sampling.max_tokens}) exceed the {max_len}-token limit per sequence"
        ))
        return True

    # ------------------------------------------------------------------ admission

    def _admit(self, bundle: ModelBundle, runner: ModelRunner) -> None:
        """Start preempted rows again, then the waiting requests that fit (see
        admission.py). Caller holds the lock."""
        blocks, prefix = self._blocks, self._prefix
        assert blocks is not None and prefix is not None and bundle.model is not None
        self._sweep_waiting()
        running = len(self._decoding) + len(self._prefilling)
        while self._preempted and running < runner.capacity:
            row = self._preempted[0]
            assert row.prefix is not None
            tokens, length = self._tokens(row), self._length(row)
            if prefix.cost(row.prefix, tokens, length) > blocks.free_blocks:
                return  # nothing new passes a preempted row
            self._preempted.popleft()
            row.blocks, row.cached = prefix.start(row.prefix, tokens, length)
            self._prefilling.append(row)
            running += 1
        if self._preempted or not self._waiting or running >= runner.capacity:
            return
        max_len = runner.max_len
        for handle in [h for h in self._waiting if self._too_long(h, max_len)]:
            self._waiting.remove(handle)
        steps = self._counters["decode_steps"]
        # No more than the free rows can start (the rest plan the same without them).
        queued = list(self._waiting)[: runner.capacity - running]
        model = bundle.model
        states = [
            prefix.state(h, model.rotary_variant(len(h.request.prompt_ids))) for h in queued
        ]
        chosen = plan_admission(
            [
                Waiting(
                    prefix.cost(state, h.request.prompt_ids, len(h.request.prompt_ids)),
                    steps - h.queued_at_step,
                )
                for h, state in zip(queued, states, strict=True)
            ],
            running=running,
            capacity=runner.capacity,
            free_blocks=blocks.free_blocks,
            join_wait_steps=self._join_wait_steps,
        )
        admitted = [queued[i] for i in chosen]
        now = time.monotonic()
        for index in chosen:
            handle = queued[index]
            self._waiting.remove(handle)
            handle.admitted_at = now
            row = self._new_row(bundle, handle)
            row.prefix = states[index]
            prompt = handle.request.prompt_ids
            row.blocks, row.cached = prefix.start(row.prefix, prompt, len(prompt))
            self._prefilling.append(row)
        if admitted and self._on_admit is not None:
            self._on_admit(admitted)

    def _new_row(self, bundle: ModelBundle, handle: RequestHandle) -> Row:
        request = handle.request
        sampling = request.sampling
        seen = None
        if sampling.repetition_penalty != 1.0:
            ids = torch.tensor(request.prompt_ids, dtype=torch.long)
            seen = ids[ids < bundle.vocab_limit].to(bundle.device)
        assert bundle.model is not None
        return Row(
            handle=handle,
            text=IncrementalText(bundle.token_bytes, stop=sampling.stop,
                                 strip=request.strip_whitespace),
            sampling=RowSampling(sampling, make_generator(sampling, bundle.device), seen),
            pacer=TextPacer(request.text_interval),
            variant=bundle.model.rotary_variant(len(request.prompt_ids)),
        )

    @staticmethod
    def _tokens(row: Row) -> list[int]:
        """The row's ids from position 0 (prompt, then answer so far)."""
        return [*row.handle.request.prompt_ids, *row.generated]

    @staticmethod
    def _length(row: Row) -> int:
        """Positions the row's prefill fills: its prompt, or for a row coming back after
        preemption its prompt and answer but the last token (its next input)."""
        return row.position if row.resumed else len(row.handle.request.prompt_ids)

    # ------------------------------------------------------------------ prefill

    def _embed(self, bundle: ModelBundle, rows: list[Row]) -> None:
        """The embeddings of what each row must prefill: its prompt (audio encoded, all
        rows in one encoder batch) and, for a resumed row, its answer but the last token
        (which is its next input)."""
        assert bundle.model is not None
        prompts = [
            list(r.handle.request.prompt_ids) + r.generated[:-1] if r.resumed
            else r.handle.request.prompt_ids
            for r in rows
        ]
        embeds = bundle.model.embed_prompts(
            prompts, [r.handle.request.audio for r in rows], [r.cached for r in rows]
        )
        for row, pending in zip(rows, embeds, strict=True):
            row.pending = pending
            row.prefilled = 0

    def _prefill_pass(self, bundle: ModelBundle, runner: ModelRunner) -> None:
        """One packed pass over the next chunks of the prefilling rows, at most
        --max-prefill-tokens of them (always at least one token of the first row)."""
        fresh = [row for row in self._prefilling if row.pending is None]
        if fresh and self._guarded(bundle, fresh, self._embed, bundle, fresh) is None:
            return
        budget = self._cache_options.max_prefill_tokens
        work: list[PrefillWork] = []
        chunked: list[Row] = []
        for row in self._prefilling:
            if budget <= 0:
                break
            assert row.pending is not None
            take = min(row.prefill_total - row.prefilled, budget)
            start = row.prefilled
            work.append(PrefillWork(
                row.pending[start : start + take], row.cached + start, row.variant, row.blocks,
                wants_logits=start + take == row.prefill_total and not row.resumed,
            ))
            chunked.append(row)
            budget -= take
        logits = self._guarded(bundle, chunked, runner.prefill, work)
        if logits is None:
            return
        self._counters["prefills"] += 1
        done: list[Row] = []
        prefix = self._prefix
        assert prefix is not None
        for row, item in zip(chunked, work, strict=True):
            row.prefilled += int(item.embeds.shape[0])
            if row.prefix is not None:
                prefix.filled(row.prefix, row.blocks, self._tokens(row),
                              row.cached + row.prefilled)
            if row.prefilled == row.prefill_total:
                done.append(row)
        if not done:
            return
        done_ids = {id(r) for r in done}
        self._prefilling = [r for r in self._prefilling if id(r) not in done_ids]
        sampled = [r for r in done if not r.resumed]
        chosen = None
        if sampled:
            samplers = [row.sampling for row in sampled]
            chosen = sample(logits, samplers, SamplingPlan(samplers, bundle.device))
        pick_of = {id(row): index for index, row in enumerate(sampled)}
        for row in done:
            prefilled = row.cached + row.prefill_total
            row.pending = None
            if row.resumed:
                token = torch.tensor([row.generated[-1]], device=bundle.device)
                row.resumed = False
            else:
                assert chosen is not None
                pick = pick_of[id(row)]
                token = chosen[pick : pick + 1]
                row.position = prefilled
                self._counters["prompt_tokens"] += prefilled
            index = len(self._decoding)
            self._decoding.append(row)
            runner.rows.load(index, token, row.position, row.variant, row.blocks)
        self._plan = None
        self._counters["peak_batch_size"] = max(
            self._counters["peak_batch_size"], len(self._decoding)
        )
        if chosen is not None:
            for index, (row, token) in enumerate(zip(sampled, chosen.tolist(), strict=True)):
                self._accept(bundle, row, token, chosen[index : index + 1])

    # ------------------------------------------------------------------ decode

    def _ensure_blocks(self, runner: ModelRunner) -> None:
        """Every decoding row holds the block its next position is written to; when the
        free blocks run short, the most recently started rows are preempted."""
        blocks = self._blocks
        assert blocks is not None
        size = blocks.block_size
        while True:
            needy = [
                (index, row) for index, row in enumerate(self._decoding)
                if row.position // size >= len(row.blocks)
            ]
            if len(needy) <= blocks.free_blocks:
                break
            self._preempt(runner)
        for index, row in needy:
            (block,) = blocks.allocate(1)
            runner.rows.set_block(index, len(row.blocks), block)
            row.blocks.append(block)

    def _preempt(self, runner: ModelRunner) -> None:
        """Free the blocks of the most recently started row; it starts again (prompt and
        answer so far prefilled anew) when blocks are free."""
        computed = 0  # a prefilling row's filled blocks are registered already
        if self._prefilling:
            row = self._prefilling.pop()
        else:
            row = self._decoding.pop()
            runner.rows.clear_from(len(self._decoding))
            row.resumed = True
            self._plan = None
            computed = row.position
        # Its blocks stay cached: it finds them again when it comes back (unless evicted).
        self._release(row, computed=computed)
        row.pending = None
        row.prefilled = 0
        self._preempted.appendleft(row)
        self._counters["preemptions"] += 1

    def _decode_pass(self, bundle: ModelBundle, runner: ModelRunner) -> None:
        self._ensure_blocks(runner)
        rows = self._decoding
        if not rows:
            return
        started = time.perf_counter()
        if self._last_step_start is not None:
            self._counters["decode_time_us"] += int((started - self._last_step_start) * 1e6)
        self._last_step_start = started
        samplers = [row.sampling for row in rows]
        if self._plan is None:
            # Built before the step is queued: its host-to-device copies then do not wait
            # for the forward pass.
            self._plan = SamplingPlan(samplers, bundle.device)
        plan = self._plan
        stepped = self._guarded(bundle, list(rows), self._decode_once, runner, rows, plan)
        if stepped is None:
            return
        chosen, tokens = stepped
        self._counters["decode_steps"] += 1
        for index, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            row.position += 1
            self._accept(bundle, row, token, chosen[index : index + 1])

    def _decode_once(
        self, runner: ModelRunner, rows: list[Row], plan: SamplingPlan
    ) -> tuple[torch.Tensor, list[int]]:
        count = len(rows)
        logits = runner.decode(count, max(row.position for row in rows))
        chosen = sample(logits, [row.sampling for row in rows], plan)
        runner.rows.advance(count, chosen)
        return chosen, chosen.tolist()  # the step's one wait for the device

    # ------------------------------------------------------------------ tokens

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
                cached_tokens=max(0, row.prefix.cached_tokens) if row.prefix else 0,
            ),
        )

    # ------------------------------------------------------------------ leaving

    def _release(self, row: Row, *, computed: int = 0, failed: bool = False) -> None:
        """Let go of the row's blocks. Those of its first ``computed`` positions (a
        decoding row's whole sequence so far) stay cached for later requests, as do its
        prompt blocks registered while prefilling; after a failure none do."""
        if row.blocks and self._prefix is not None:
            self._prefix.release(row.prefix, row.blocks, self._tokens(row), computed,
                                 failed=failed)
        row.blocks = []

    def _reload(self, index: int, row: Row) -> None:
        """Device row ``index`` from the host's view of ``row`` (after a fault)."""
        assert self._runner is not None and self._bundle is not None
        token = torch.tensor([row.generated[-1] if row.generated else 0],
                             device=self._bundle.device)
        self._runner.rows.load(index, token, row.position, row.variant, row.blocks)

    def _retire(self) -> None:
        """Drop finished, cancelled and timed-out rows and free their blocks; the last
        decoding rows move into the freed places, so the batch keeps rows 0..n-1."""
        now = time.monotonic()
        for queue in (self._prefilling, list(self._preempted)):
            for row in queue:
                if row.finished or self._gone(row.handle, now):
                    row.finished = True
                    self._release(row)
        self._prefilling = [r for r in self._prefilling if not r.finished]
        self._preempted = collections.deque(r for r in self._preempted if not r.finished)
        rows = self._decoding
        if not rows:
            return
        leaving = {id(r) for r in rows if r.finished or self._gone(r.handle, now)}
        if not leaving:
            return
        runner = self._runner
        assert runner is not None
        live = list(rows)
        for row in live:
            if id(row) in leaving:
                self._release(row, computed=row.position)
        index = 0
        while index < len(live):
            if id(live[index]) not in leaving:
                index += 1
                continue
            while live and id(live[-1]) in leaving:
                live.pop()
            if index >= len(live):
                break
            runner.rows.move(len(live) - 1, index)
            live[index] = live.pop()
            index += 1
        runner.rows.clear_from(len(live))
        self._decoding = live
        self._plan = None

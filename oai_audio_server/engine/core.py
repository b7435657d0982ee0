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
from oai_audio_server.engine.batch import Row, with_followers
from oai_audio_server.engine.cache_plan import CacheOptions, pick_attention_backend, plan_cache
from oai_audio_server.engine.detokenizer import IncrementalText
from oai_audio_server.engine.handles import (
    EventSink,
    LoopSink,
    Outbox,
    RequestHandle,
    group_choices,
)
from oai_audio_server.engine.loader import ModelBundle
from oai_audio_server.engine.pacing import TextPacer
from oai_audio_server.engine.prefix import PrefixCache, PrefixState, model_fingerprint
from oai_audio_server.engine.runner import ModelRunner, PrefillWork
from oai_audio_server.engine.sampling import BatchSampler, HostStep, RowSpec, SampledStep
from oai_audio_server.engine.types import (
    Failed,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    TextDelta,
    TokenLogprob,
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
from oai_audio_server.models.kv_cache import PagedKVCache, blocks_needed

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
        overlap_steps: bool | None = None,
    ) -> None:
        """``max_batch_size`` 0 = auto (see cache_plan.py). ``on_admit`` sees the
        requests leaving the queue; ``on_step`` runs after every worker step (both on the
        worker thread; for an engine in another process). ``overlap_steps``: queue each
        decode step before reading the previous one (None: on a GPU, where the host's work
        then hides behind the device's; on a CPU it would only delay every token)."""
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
        self._sampler: BatchSampler | None = None  # sampler rows = decoding rows
        # Worker-thread state: rows decoding (device rows 0..n-1, in order), rows still
        # prefilling, and rows preempted (no blocks; they start again first).
        self._decoding: list[Row] = []
        self._prefilling: list[Row] = []
        self._preempted: collections.deque[Row] = collections.deque()
        self._last_step_start: float | None = None
        # A decode step queued but not read yet (overlapped stepping), with its rows.
        self._in_flight: tuple[list[Row], SampledStep] | None = None
        self._overlap = overlap_steps
        self._faults = 0  # rows failed so far: a step queued before a fault is stale

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
        for previous, handle in zip(handles, handles[1:], strict=False):
            if handle.request.same_prompt_as_previous:
                handle.leader = previous.leader or previous
        for request in requests:  # compiled off the step loop (a cache hit, usually)
            if request.sampling.grammar is not None:
                self.bundle.grammars.prefetch(request.sampling.grammar)
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
                self._sampler = BatchSampler(runner.capacity, bundle.vocab_limit, bundle.device)
        except BaseException as exc:  # reported by /health; the thread ends
            logger.exception("model load failed")
            self._load_error = exc
            return
        self._bundle = bundle
        self._runner = runner
        if self._overlap is None:
            self._overlap = bundle.device.type == "cuda"
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
        rows = with_followers(self._decoding + self._prefilling + list(self._preempted))
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
        """Fail these rows (and the choices waiting on their prompt) and free what they
        hold (their blocks' contents are unknown)."""
        error = EngineError(f"generation failed: {type(exc).__name__}: {exc}")
        rows = with_followers(rows)
        failing = {id(row) for row in rows}
        for row in rows:
            if not row.finished:
                row.finished = True
                self._fail(row.handle, error)
            self._release(row, failed=True)
        self._decoding = [r for r in self._decoding if id(r) not in failing]
        self._prefilling = [r for r in self._prefilling if id(r) not in failing]
        self._in_flight = None  # the survivors go on from the tokens they have read
        self._faults += 1
        if self._runner is not None:
            self._reload_decoding()
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
        running = len(with_followers(self._decoding + self._prefilling))
        while self._preempted:
            row = self._preempted[0]
            rows = 1 + len(row.followers)
            if running + rows > runner.capacity or self._blocks_to_start(row) > blocks.free_blocks:
                return  # nothing new passes a preempted row
            self._preempted.popleft()
            self._take_blocks(row)
            self._prefilling.append(row)
            running += rows
        if not self._waiting or running >= runner.capacity:
            return
        max_len = runner.max_len
        for handle in [h for h in self._waiting if self._too_long(h, max_len)]:
            self._waiting.remove(handle)
        steps = self._counters["decode_steps"]

        def fits(leader: RequestHandle, size: int) -> bool:
            # Choices that together could never fit the cache prefill one by one.
            prompt = blocks_needed(len(leader.request.prompt_ids), blocks.block_size)
            return prompt + size - 1 <= blocks.num_blocks

        units = self._startable(
            group_choices(list(self._waiting), runner.capacity, fits), runner.capacity - running
        )
        # Block keys (audio hashed once per request) and the cached prefix; a request
        # whose keys cannot be made (its audio does not match its prompt) fails alone.
        states = []
        for unit in list(units):
            state = self._guarded_state(bundle, unit)
            if state is None:
                units.remove(unit)
            else:
                states.append(state)
        chosen = plan_admission(
            [
                Waiting(
                    # the blocks its prompt takes (a cached prefix that running rows hold
                    # is free), and one for each other choice's last block
                    prefix.cost(state, unit[0].request.prompt_ids,
                                len(unit[0].request.prompt_ids))
                    + len(unit) - 1,
                    steps - unit[0].queued_at_step,
                    rows=len(unit),
                )
                for unit, state in zip(units, states, strict=True)
            ],
            running=running,
            capacity=runner.capacity,
            free_blocks=blocks.free_blocks,
            join_wait_steps=self._join_wait_steps,
        )
        admitted: list[RequestHandle] = []
        now = time.monotonic()
        for index in chosen:
            unit, state = units[index], states[index]
            prompt = unit[0].request.prompt_ids
            if prefix.cost(state, prompt, len(prompt)) + len(unit) - 1 > blocks.free_blocks:
                break  # an earlier start evicted part of its cached prefix: next time
            leader, *others = (self._new_row(bundle, handle) for handle in unit)
            leader.followers = others
            leader.prefix = state
            self._take_blocks(leader)  # before it leaves the queue: nothing is lost
            for row in (leader, *others):
                self._waiting.remove(row.handle)
                row.handle.admitted_at = now
            for follower in others:
                follower.prefix = prefix.choice_state(state)
            self._prefilling.append(leader)
            admitted += unit
        if admitted and self._on_admit is not None:
            self._on_admit(admitted)

    def _guarded_state(self, bundle: ModelBundle, unit: list[RequestHandle]) -> PrefixState | None:
        """The unit's prefix-cache state, or None after failing (and dequeuing) the unit."""
        assert self._prefix is not None and bundle.model is not None
        leader = unit[0]
        try:
            return self._prefix.state(
                leader, bundle.model.rotary_variant(len(leader.request.prompt_ids))
            )
        except Exception as exc:
            logger.exception("request %s cannot start", leader.request.request_id)
            error = EngineError(f"generation failed: {type(exc).__name__}: {exc}")
            for handle in unit:
                self._waiting.remove(handle)
                self._fail(handle, error)
            return None

    @staticmethod
    def _startable(
        units: list[list[RequestHandle]], free_rows: int
    ) -> list[list[RequestHandle]]:
        """The leading units that free rows could hold, and the first that they could not
        (admission stops there): what later units would cost is never looked up."""
        for index, unit in enumerate(units):
            free_rows -= len(unit)
            if free_rows < 0:
                return units[: index + 1]
        return units

    def _blocks_to_start(self, row: Row) -> int:
        """Free blocks the row takes to start: what its prefill writes but a cached
        prefix that running rows hold (engine/prefix.py), and one per follower."""
        assert self._prefix is not None and row.prefix is not None
        tokens = self._tokens(row)
        return self._prefix.cost(row.prefix, tokens, row.prefill_positions) + len(row.followers)

    def _take_blocks(self, row: Row) -> None:
        """Blocks for what the row prefills, and one per follower (its copy of the
        prompt's last block, or its first answer block when the prompt fills its blocks)."""
        blocks, prefix = self._blocks, self._prefix
        assert blocks is not None and prefix is not None and row.prefix is not None
        row.blocks, row.cached = prefix.start(row.prefix, self._tokens(row),
                                              row.prefill_positions)
        for follower in row.followers:
            follower.blocks = blocks.allocate(1)

    def _new_row(self, bundle: ModelBundle, handle: RequestHandle) -> Row:
        request = handle.request
        assert bundle.model is not None
        return Row(
            handle=handle,
            text=IncrementalText(bundle.token_bytes, stop=request.sampling.stop,
                                 strip=request.strip_whitespace),
            pacer=TextPacer(request.text_interval),
            variant=bundle.model.rotary_variant(len(request.prompt_ids)),
        )

    @staticmethod
    def _tokens(row: Row) -> list[int]:
        """The row's ids from position 0 (prompt, then answer so far)."""
        return [*row.handle.request.prompt_ids, *row.generated]

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
        self._guarded(bundle, done, self._join, bundle, runner, done, logits)

    def _join(
        self, bundle: ModelBundle, runner: ModelRunner, done: list[Row], logits: torch.Tensor
    ) -> None:
        """Rows whose prefill ended join the decoding rows (and the sampler's rows at the
        same indices): new rows with their other choices, which sample their first token
        from the prompt's logits, then resumed rows, whose next input is known."""
        sampler = self._sampler
        assert sampler is not None
        fresh = [r for r in done if not r.resumed]
        joining: list[Row] = []
        logit_rows: list[int] = []
        for pick, row in enumerate(fresh):
            row.position = row.cached + row.prefill_total
            self._counters["prompt_tokens"] += row.position
            for follower in row.followers:
                self._fork(runner, row, follower)
            for member in (row, *row.followers):
                if not self._gone(member.handle, time.monotonic()):
                    joining.append(member)
                    logit_rows.append(pick)
                else:
                    member.finished = True
                    self._release(member, computed=row.position)
        start = len(self._decoding)
        step: HostStep | None = None
        if joining:
            self._add_to_sampler(bundle, start, joining)
            picked = logits.index_select(0, torch.tensor(logit_rows, device=logits.device))
            sampled = sampler.sample(picked, start)
            for offset, row in enumerate(joining):
                runner.rows.load(start + offset, sampled.ids[offset : offset + 1],
                                 row.position, row.variant, row.blocks)
            step = sampled.to_host()
        self._decoding.extend(joining)
        resumed = [r for r in done if r.resumed]
        if resumed:
            self._add_to_sampler(bundle, len(self._decoding), resumed)
            for row in resumed:
                token = torch.tensor([row.generated[-1]], device=bundle.device)
                runner.rows.load(len(self._decoding), token, row.position, row.variant,
                                 row.blocks)
                row.resumed = False
                self._decoding.append(row)
        for row in done:
            row.pending = None
        self._counters["peak_batch_size"] = max(
            self._counters["peak_batch_size"], len(self._decoding)
        )
        if step is not None:
            self._accept_step(bundle, joining, step)
        for row in fresh:
            # Rows of their own from now on. Kept until here: a fault above fails the
            # choices with their first one (they are not reachable otherwise).
            row.followers = []

    def _fork(self, runner: ModelRunner, row: Row, follower: Row) -> None:
        """Another choice of ``row``'s prompt, just prefilled: it takes the prompt's full
        blocks by reference and a copy of a partly filled last block (which both rows
        write their answers into), in the block it held since admission."""
        blocks = self._blocks
        assert blocks is not None
        (own,) = follower.blocks
        partial = row.position % blocks.block_size != 0
        shared = row.blocks[:-1] if partial else list(row.blocks)
        blocks.share(shared)
        if partial:
            runner.cache.copy_block(row.blocks[-1], own)
        follower.blocks = [*shared, own]
        follower.position = row.position
        follower.variant = row.variant

    def _add_to_sampler(self, bundle: ModelBundle, start: int, rows: Sequence[Row]) -> None:
        """Rows ``start..`` of the sampler; a resumed row keeps its state (seed, grammar
        matcher, counts rebuilt from its answer)."""
        sampler = self._sampler
        assert sampler is not None
        specs = []
        for row in rows:
            request = row.handle.request
            grammar = request.sampling.grammar
            specs.append(RowSpec(
                request.sampling, request.prompt_ids,
                bundle.grammars.compile(grammar)
                if grammar is not None and row.sampling is None else None,
                resume=row.sampling, generated=row.generated,
            ))
        for row, state in zip(rows, sampler.add_rows(start, specs), strict=True):
            row.sampling = state

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
            for follower in row.followers:
                self._release(follower)
        else:
            row = self._decoding.pop()
            runner.rows.clear_from(len(self._decoding))
            assert self._sampler is not None
            self._sampler.clear_from(len(self._decoding))
            row.resumed = True
            # not counting a queued step's token, which is dropped and drawn again
            row.position = self._cached_length(row)
            computed = row.position
        # Its blocks stay cached: it finds them again when it comes back (unless evicted).
        self._release(row, computed=computed)
        row.pending = None
        row.prefilled = 0
        self._preempted.appendleft(row)
        self._counters["preemptions"] += 1

    def _decode_pass(self, bundle: ModelBundle, runner: ModelRunner) -> None:
        """One decode step of every decoding row. Overlapped (on a GPU): the step is
        queued before the previous step's ids are read, so the device computes step k+1
        while the host detokenizes step k; a row that finished at step k has its step k+1
        token dropped. Rows with a grammar need step k's token in their matcher before
        step k+1's mask exists, so a batch holding one steps in lockstep."""
        in_flight, self._in_flight = self._in_flight, None
        self._ensure_blocks(runner)
        rows = list(self._decoding)
        overlap = bool(self._overlap) and not any(
            row.handle.request.sampling.grammar is not None for row in rows
        )
        if in_flight is not None and not overlap:
            self._read_step(bundle, *in_flight)
            in_flight = None
            rows = [row for row in rows if not row.finished]
            if len(rows) != len(self._decoding):
                self._retire()  # the batch must be rows 0..n-1 again before a step
                rows = list(self._decoding)
        launched = self._launch_step(bundle, runner, rows) if rows else None
        if in_flight is not None:
            faults = self._faults
            self._read_step(bundle, *in_flight)
            if self._faults != faults:
                # The survivors were reloaded from the tokens read so far: the step just
                # queued ran on the state before that, and its tokens are dropped.
                launched = None
        if launched is not None:
            if overlap:
                self._in_flight = (rows, launched)
            else:
                self._read_step(bundle, rows, launched)

    def _launch_step(
        self, bundle: ModelBundle, runner: ModelRunner, rows: list[Row]
    ) -> SampledStep | None:
        started = time.perf_counter()
        if self._last_step_start is not None:
            self._counters["decode_time_us"] += int((started - self._last_step_start) * 1e6)
        self._last_step_start = started
        step = self._guarded(bundle, rows, self._decode_once, runner, rows)
        if step is None:
            return None
        self._counters["decode_steps"] += 1
        for row in rows:
            row.position += 1
        return step

    def _decode_once(self, runner: ModelRunner, rows: list[Row]) -> SampledStep:
        count = len(rows)
        logits = runner.decode(count, max(row.position for row in rows))
        assert self._sampler is not None
        # Grammar masks are filled on the host while the device computes the logits.
        step = self._sampler.sample(logits)
        runner.rows.advance(count, step.ids)
        return step

    def _read_step(self, bundle: ModelBundle, rows: list[Row], step: SampledStep) -> None:
        """The step's one wait for the device, then its tokens for the rows it ran for
        (rows that finished, failed or were preempted since it was queued drop theirs)."""
        host = self._guarded(bundle, rows, step.to_host)
        if host is None:
            return
        decoding = {id(row) for row in self._decoding}
        for row, token, logprob in zip(rows, host.tokens, host.logprobs, strict=True):
            if not row.finished and id(row) in decoding:
                self._accept(bundle, row, token, logprob)

    # ------------------------------------------------------------------ tokens

    def _accept_step(self, bundle: ModelBundle, rows: Sequence[Row], host: HostStep) -> None:
        for row, token, logprob in zip(rows, host.tokens, host.logprobs, strict=True):
            self._accept(bundle, row, token, logprob)

    def _accept(
        self, bundle: ModelBundle, row: Row, token: int, logprob: TokenLogprob | None
    ) -> None:
        row.generated.append(token)
        self._counters["completion_tokens"] += 1
        if token in bundle.stop_token_ids:
            self._finish(row, "stop")
            return
        if logprob is not None:  # handed over with the text it belongs to
            self._pending_logprobs(row).append(logprob)
        self._emit_text(row, row.pacer.push(row.text.push(token), time.monotonic()))
        if row.text.stopped:
            self._finish(row, "stop")
        elif len(row.generated) >= row.handle.request.sampling.max_tokens:
            self._finish(row, "length")

    @staticmethod
    def _pending_logprobs(row: Row) -> list[TokenLogprob]:
        assert row.sampling is not None
        return row.sampling.pending_logprobs

    def _take_logprobs(self, row: Row) -> tuple[TokenLogprob, ...]:
        pending = self._pending_logprobs(row)
        taken = tuple(pending)
        pending.clear()
        return taken

    def _emit_text(self, row: Row, text: str) -> None:
        if text:
            self._emit(row.handle, TextDelta(text, self._take_logprobs(row)))

    def _finish(self, row: Row, reason: FinishReason) -> None:
        tail = row.pacer.drain() + row.text.finish()
        logprobs = self._take_logprobs(row)
        if tail or logprobs:
            self._emit(row.handle, TextDelta(tail, logprobs))
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

    def _reload_decoding(self) -> None:
        """Device rows and sampler rows 0..n-1 from the host's view of the decoding rows
        (after a fault took some rows out)."""
        runner, bundle, sampler = self._runner, self._bundle, self._sampler
        assert runner is not None and bundle is not None and sampler is not None
        rows = self._decoding
        for index, row in enumerate(rows):
            row.position = self._cached_length(row)
            token = torch.tensor([row.generated[-1]], device=bundle.device)
            runner.rows.load(index, token, row.position, row.variant, row.blocks)
        runner.rows.clear_from(len(rows))
        sampler.clear_from(0)
        if rows:
            self._add_to_sampler(bundle, 0, rows)

    @staticmethod
    def _cached_length(row: Row) -> int:
        """Positions a decoding row has in the cache as of the tokens read so far (its
        prompt and its answer but the last token, which is its next input)."""
        return len(row.handle.request.prompt_ids) + len(row.generated) - 1

    def _retire(self) -> None:
        """Drop finished, cancelled and timed-out rows and free their blocks; the last
        decoding rows move into the freed places, so the batch keeps rows 0..n-1."""
        now = time.monotonic()
        for queue in (self._prefilling, list(self._preempted)):
            for row in queue:
                if row.finished or self._gone(row.handle, now):
                    row.finished = True
                    self._release(row)
                    for follower in row.followers:
                        # the other choices of a prompt whose prefill stopped
                        if not self._gone(follower.handle, now):
                            self._fail(follower.handle, EngineError(
                                "the request's first choice was cancelled"))
                        follower.finished = True
                        self._release(follower)
        self._prefilling = [r for r in self._prefilling if not r.finished]
        self._preempted = collections.deque(r for r in self._preempted if not r.finished)
        rows = self._decoding
        if not rows:
            return
        leaving = {id(r) for r in rows if r.finished or self._gone(r.handle, now)}
        if not leaving:
            return
        runner, sampler = self._runner, self._sampler
        assert runner is not None and sampler is not None
        live = list(rows)
        for row in live:
            if id(row) in leaving:
                self._release(row, computed=self._cached_length(row))
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
            sampler.move(len(live) - 1, index)
            live[index] = live.pop()
            index += 1
        runner.rows.clear_from(len(live))
        sampler.clear_from(len(live))
        self._decoding = live
        if not live:
            self._in_flight = None  # a step queued for rows that are all gone

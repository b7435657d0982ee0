"""The engine in a process of its own, so that the model's Python never waits for the
GIL behind HTTP work, and HTTP work never waits behind the model.

With the engine in a thread of the server process, every decode step competed for the
GIL with the event loop (parsing requests, encoding and writing SSE chunks): with eight
streaming clients the worker thread used 15% more CPU for the same tokens and the
server made 30% fewer tokens a second than with non-streamed replies.

The child process runs a ``BatchingEngine`` (its worker thread owns the model) and a
command loop. The server process keeps what HTTP needs without the weights (tokenizer,
audio features, limits: a bundle with ``model`` None), counts the waiting requests
itself so that a full queue is a 429 before a stream starts, and one reader thread
hands each worker step's events to the event loop in a single call.

Messages are pickled with the standard pickler: tensors travel as bytes, never as
shared-memory files that a crash could leave behind.

    server -> engine  ("submit", [(ticket, GenerationRequest), ...])
                      ("cancel", ticket)
                      ("stop",)
    engine -> server  ("ready", ModelInfo) | ("load_failed", message)
                      ("admitted", [ticket, ...])     left the queue for the batch
                      ("events", [(ticket, GenerationEvent), ...])
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from oai_audio_server.engine.cache_plan import CacheOptions
from oai_audio_server.engine.core import COUNTERS, PREFIX_STATS, BatchingEngine
from oai_audio_server.engine.handles import LoopSink, Outbox, RequestHandle
from oai_audio_server.engine.load_report import ModelLoadError, explained_loader
from oai_audio_server.engine.loader import ModelBundle, ModelInfo, load_front_bundle
from oai_audio_server.engine.types import (
    Failed,
    Finished,
    GenerationEvent,
    GenerationRequest,
)
from oai_audio_server.errors import (
    APIError,
    EngineError,
    NotReadyError,
    OverloadedError,
    ShuttingDownError,
)
from oai_audio_server.heap import freeze_long_lived_objects
from oai_audio_server.settings import Settings

logger = logging.getLogger(__name__)

STAT_NAMES = (
    "queue_depth", "batch_size", "kv_blocks_total", "kv_blocks_free", *PREFIX_STATS, *COUNTERS
)
Connection = multiprocessing.connection.Connection


def _send(conn: Connection, lock: threading.Lock, message: tuple[Any, ...]) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    with lock:
        conn.send_bytes(payload)


def _receive(conn: Connection) -> tuple[Any, ...]:
    message: tuple[Any, ...] = pickle.loads(conn.recv_bytes())
    return message


# ---------------------------------------------------------------------- server side


class RemoteHandle(RequestHandle):
    """A request whose events come from the engine process."""

    def __init__(
        self,
        request: GenerationRequest,
        sink: LoopSink,
        ticket: int,
        on_cancel: Callable[[int], None],
    ) -> None:
        super().__init__(request, sink)
        self.ticket = ticket
        self._on_cancel = on_cancel

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._on_cancel(self.ticket)


class EngineProcess:
    """The BatchingEngine interface (start, close, ready, load_error, bundle, submit,
    submit_group, stats), with the model in a child process."""

    def __init__(
        self,
        settings: Settings,
        *,
        max_batch_size: int = 0,
        max_queue: int = 64,
        join_wait_steps: int = 0,
    ) -> None:
        self._settings = settings
        self._limits = (max_batch_size, join_wait_steps)
        self._max_queue = max_queue
        # spawn, not fork: CUDA cannot be used in a forked child, and a fork would copy
        # the server's threads' locks in whatever state they were in.
        self._context = multiprocessing.get_context("spawn")
        self._shared_stats = self._context.Array("d", len(STAT_NAMES), lock=False)
        self._conn: Connection | None = None
        self._process: Any = None
        self._reader: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        # Messages to the engine, pickled and sent by the writer thread: a request with
        # minutes of audio is megabytes, and the event loop must not wait for the pipe.
        self._outgoing: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # guards the tickets and the waiting set
        self._handles: dict[int, RemoteHandle] = {}
        self._waiting: set[int] = set()
        self._tickets = itertools.count()
        self._rejected = 0
        self._bundle: ModelBundle | None = None
        self._load_error: BaseException | None = None
        self._stopping = False
        self._gone = False
        self.crash_reason: str | None = None
        # Called (from the reader thread) when the engine process ends unexpectedly,
        # after the requests in flight were failed.
        self.on_crash: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        self._conn, child_conn = self._context.Pipe(duplex=True)
        max_batch_size, join_wait_steps = self._limits
        self._process = self._context.Process(
            target=run_engine_process,
            args=(self._settings, child_conn, self._shared_stats, max_batch_size,
                  join_wait_steps),
            name="oas-engine",
            daemon=True,  # never outlives the server
        )
        self._process.start()
        child_conn.close()  # the child's end lives in the child now
        self._reader = threading.Thread(target=self._read, name="oas-engine-reader", daemon=True)
        self._reader.start()
        self._writer = threading.Thread(target=self._write, name="oas-engine-writer", daemon=True)
        self._writer.start()
        # Whatever way this process ends, the engine (and its GPU memory) goes with it.
        atexit.register(self._kill)

    def close(self, timeout: float = 10.0) -> None:
        """Fail what is in flight at once, ask the engine to stop, and kill it if it has
        not ended within ``timeout`` (it holds nothing that needs a clean stop)."""
        self._stopping = True
        with self._lock:
            tickets = list(self._handles)
        self._fail_tickets(tickets, ShuttingDownError("the server is shutting down"))
        if self._writer is not None:
            self._outgoing.put(("stop",))
            self._outgoing.put(None)
            self._writer.join(timeout)
        if self._process is not None:
            self._process.join(timeout)
            if self._process.is_alive():
                # It ignores SIGTERM (see run_engine_process), so no terminate().
                # Expected when it is busy: it holds nothing that needs a clean stop.
                logger.info("engine process did not stop in %g s; killing it", timeout)
                self._kill()
        if self._reader is not None:
            self._reader.join(timeout)
        if self._conn is not None:
            self._conn.close()
        self._bundle = None

    def _kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(5)

    @property
    def ready(self) -> bool:
        return self._bundle is not None and not self._stopping and not self._gone

    @property
    def load_error(self) -> BaseException | None:
        return self._load_error

    @property
    def bundle(self) -> ModelBundle:
        if self._bundle is None:
            raise NotReadyError("the model is still loading; retry shortly")
        return self._bundle

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    # ------------------------------------------------------------------ requests

    def submit(self, request: GenerationRequest) -> RemoteHandle:
        return self.submit_group([request])[0]

    def submit_group(self, requests: list[GenerationRequest]) -> list[RemoteHandle]:
        """One admission decision for the whole group, as BatchingEngine.submit_group."""
        if not self.ready or self._conn is None:
            raise NotReadyError("the model is not ready; retry shortly")
        sink = LoopSink(asyncio.get_running_loop())
        with self._lock:
            if len(self._waiting) >= self._max_queue:
                self._rejected += 1
                raise OverloadedError(
                    f"the server is busy ({self._max_queue} requests already waiting); "
                    "retry after the time given in Retry-After"
                )
            handles = [
                RemoteHandle(request, sink, next(self._tickets), self._cancel)
                for request in requests
            ]
            for handle in handles:
                self._handles[handle.ticket] = handle
                self._waiting.add(handle.ticket)
        self._outgoing.put(("submit", [(h.ticket, h.request) for h in handles]))
        return handles

    def stats(self) -> dict[str, float]:
        values = dict(zip(STAT_NAMES, self._shared_stats, strict=True))
        values["queue_depth"] = float(len(self._waiting))
        values["rejected_overloaded"] += self._rejected
        return values

    def _cancel(self, ticket: int) -> None:
        """The client is gone: its queue slot is free now, and the engine drops the row
        at its next step. Events still on their way for it are ignored."""
        if self._forget([ticket]) and not self._gone:
            self._outgoing.put(("cancel", ticket))

    def _forget(self, tickets: list[int]) -> list[RemoteHandle]:
        """Stop tracking these requests; the handles that were still open."""
        with self._lock:
            self._waiting.difference_update(tickets)
            found = (self._handles.pop(ticket, None) for ticket in tickets)
            return [handle for handle in found if handle is not None]

    # ------------------------------------------------------------------ writer thread

    def _write(self) -> None:
        assert self._conn is not None
        while (message := self._outgoing.get()) is not None:
            try:
                _send(self._conn, self._send_lock, message)
            except Exception as exc:  # a gone engine, or a request that cannot be pickled
                if message[0] == "submit":
                    tickets = [ticket for ticket, _ in message[1]]
                    error = EngineError(f"the request could not be sent to the engine: {exc}")
                    self._fail_tickets(tickets, error)
                if not isinstance(exc, OSError):
                    logger.exception("sending to the engine process failed")

    def _fail_tickets(self, tickets: list[int], error: APIError) -> None:
        outbox = Outbox()
        for handle in self._forget(tickets):
            outbox.add(handle, Failed(error))
        outbox.flush()

    # ------------------------------------------------------------------ reader thread

    def _read(self) -> None:
        assert self._conn is not None
        try:
            while True:
                message = _receive(self._conn)
                kind = message[0]
                if kind == "events":
                    self._deliver(message[1])
                elif kind == "admitted":
                    with self._lock:
                        self._waiting.difference_update(message[1])
                elif kind == "ready":
                    self._front(message[1])
                elif kind == "load_failed":
                    self._load_error = ModelLoadError(message[1])
        except (EOFError, OSError):
            pass
        except Exception:  # a message that cannot be read: nothing after it can be trusted
            logger.exception("engine process: unreadable message")
        finally:
            self._on_gone()

    def _front(self, info: ModelInfo) -> None:
        try:
            self._bundle = load_front_bundle(info)
        except Exception as exc:
            logger.exception("loading the tokenizer failed")
            self._load_error = exc
            return
        freeze_long_lived_objects()
        logger.info("model ready in engine process %s", self.pid)

    def _deliver(self, items: list[tuple[int, GenerationEvent]]) -> None:
        outbox = Outbox()
        for ticket, event in items:
            handle = self._handles.get(ticket)
            if handle is None:
                continue  # cancelled: nobody reads it
            if isinstance(event, Finished | Failed):
                self._forget([ticket])
            outbox.add(handle, event)
        outbox.flush()

    def _on_gone(self) -> None:
        """The engine process ended (or its channel broke): fail whatever was still
        waiting for it."""
        self._gone = True
        crashed = not self._stopping and self._bundle is not None
        if self._stopping:
            error: APIError = ShuttingDownError("the server is shutting down")
        else:
            if self._process is not None:
                self._process.join(5)
                self._kill()  # alive behind a broken channel: of no use, holding memory
            code = self._process.exitcode if self._process is not None else None
            message = f"the engine process stopped (exit code {code})"
            if self._load_error is None and not crashed:
                # It ended while loading without reporting why (killed, out of memory).
                self._load_error = RuntimeError(message)
            if crashed:
                self.crash_reason = message
            error = EngineError(message + "; the server restarts")
        with self._lock:
            tickets = list(self._handles)
        self._fail_tickets(tickets, error)
        if crashed and self.crash_reason is not None and self.on_crash is not None:
            self.on_crash(self.crash_reason)


# ---------------------------------------------------------------------- engine side


class _PipeSink:
    """Delivers a step's events to the server process in one message, and knows which
    ticket each request has (until its last event, or its cancellation)."""

    def __init__(self, conn: Connection, lock: threading.Lock) -> None:
        self._conn = conn
        self._send_lock = lock
        self._lock = threading.Lock()
        self._tickets: dict[int, int] = {}  # id(request) -> ticket
        self._handles: dict[int, RequestHandle] = {}  # ticket -> handle, for cancel

    def register(self, pairs: list[tuple[int, GenerationRequest]]) -> None:
        """Before submitting: the worker may emit events at once."""
        with self._lock:
            for ticket, request in pairs:
                self._tickets[id(request)] = ticket

    def unregister(self, pairs: list[tuple[int, GenerationRequest]]) -> None:
        with self._lock:
            for _, request in pairs:
                self._tickets.pop(id(request), None)

    def attach(self, handles: list[RequestHandle]) -> None:
        with self._lock:
            for handle in handles:
                ticket = self._tickets.get(id(handle.request))
                if ticket is not None:  # not finished already
                    self._handles[ticket] = handle

    def forget(self, ticket: int) -> RequestHandle | None:
        with self._lock:
            handle = self._handles.pop(ticket, None)
            if handle is not None:
                self._tickets.pop(id(handle.request), None)
            return handle

    def ticket_of(self, handle: RequestHandle) -> int | None:
        with self._lock:
            return self._tickets.get(id(handle.request))

    def deliver(self, items: list[tuple[RequestHandle, GenerationEvent]]) -> None:
        payload: list[tuple[int, GenerationEvent]] = []
        with self._lock:
            for handle, event in items:
                ticket = self._tickets.get(id(handle.request))
                if ticket is None:
                    continue  # cancelled
                if isinstance(event, Finished | Failed):
                    del self._tickets[id(handle.request)]
                    self._handles.pop(ticket, None)
                payload.append((ticket, event))
        if payload:
            try:
                _send(self._conn, self._send_lock, ("events", payload))
            except OSError:  # the server is gone; the command loop ends on its own
                pass
            except Exception:  # an event that cannot be pickled: its request fails
                logger.exception("sending events to the server failed")
                error = EngineError("an event could not be sent")
                failed = [(ticket, Failed(error)) for ticket, _ in payload]
                _send(self._conn, self._send_lock, ("events", failed))


def run_engine_process(
    settings: Settings,
    conn: Connection,
    shared_stats: Any,
    max_batch_size: int,
    join_wait_steps: int,
) -> None:
    """Entry point of the child process."""
    # The server process decides when to stop (it drains first on SIGTERM); a signal
    # sent to the whole process group must not kill the engine under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from oai_audio_server.logging_setup import configure_logging

    configure_logging(json_lines=settings.log_json, level=settings.log_level)
    _EngineSide(settings, conn, shared_stats, max_batch_size, join_wait_steps).run()
    # Nothing is left to save; skip the interpreter's teardown (seconds with torch
    # loaded), so that a stopping server exits within its orchestrator's grace period.
    logging.shutdown()
    os._exit(0)


class _EngineSide:
    def __init__(
        self,
        settings: Settings,
        conn: Connection,
        shared_stats: Any,
        max_batch_size: int,
        join_wait_steps: int,
    ) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()
        self._sink = _PipeSink(conn, self._send_lock)
        self._shared_stats = shared_stats
        self.engine = BatchingEngine(
            explained_loader(settings),
            max_batch_size=max_batch_size,
            max_queue=sys.maxsize,  # the server process bounds the queue
            join_wait_steps=join_wait_steps,
            cache=CacheOptions.from_settings(settings),
            on_admit=self._admitted,
            on_step=self._publish_stats,
        )

    def run(self) -> None:
        self.engine.start()
        try:
            if not self._wait_for_model():
                return
            self._publish_stats()
            _send(self._conn, self._send_lock, ("ready", ModelInfo.of(self.engine.bundle)))
            self._serve_commands()
        except (EOFError, OSError):
            pass  # the server process is gone
        finally:
            self.engine.close()

    def _wait_for_model(self) -> bool:
        while not self.engine.ready:
            error = self.engine.load_error
            if error is not None:
                if isinstance(error, ModelLoadError):
                    message = str(error)
                else:
                    message = f"{type(error).__name__}: {error}"
                _send(self._conn, self._send_lock, ("load_failed", message))
                return False
            if self._conn.poll(0.05):
                # "stop" (or the server gone) while loading: a load cannot be interrupted,
                # and a download or a CUDA call may take minutes; end the process now.
                logger.info("engine process stopped while loading the model")
                os._exit(0)
        return True

    def _serve_commands(self) -> None:
        while True:
            if not self._conn.poll(1.0):
                if not self.engine.worker_alive:
                    # Nothing else enforces deadlines or answers requests: end the
                    # process, so that the server fails them and reports it.
                    logger.error("the engine worker thread ended; stopping the process")
                    return
                continue
            message = _receive(self._conn)
            kind = message[0]
            if kind == "submit":
                self._submit(message[1])
            elif kind == "cancel":
                handle = self._sink.forget(message[1])
                if handle is not None:
                    handle.cancel()
            elif kind == "stop":
                return

    def _submit(self, pairs: list[tuple[int, GenerationRequest]]) -> None:
        self._sink.register(pairs)
        try:
            handles = self.engine.submit_group([request for _, request in pairs], self._sink)
        except APIError as exc:
            self._sink.unregister(pairs)
            failures = [(ticket, Failed(exc)) for ticket, _ in pairs]
            _send(self._conn, self._send_lock, ("events", failures))
            return
        self._sink.attach(handles)

    def _admitted(self, handles: list[RequestHandle]) -> None:
        tickets = [t for h in handles if (t := self._sink.ticket_of(h)) is not None]
        if tickets:
            try:
                _send(self._conn, self._send_lock, ("admitted", tickets))
            except OSError:  # the server is gone; the command loop ends on its own
                pass

    def _publish_stats(self) -> None:
        stats = self.engine.stats()
        for index, name in enumerate(STAT_NAMES):
            self._shared_stats[index] = stats.get(name, 0.0)

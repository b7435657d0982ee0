"""The server's states after start: serving, draining (after SIGTERM), cut (the drain's
deadline passed), fatal (the engine died; the process is about to exit non-zero) and
load failed (the model never loaded; the CLI's server exits non-zero with the cause).

The HTTP layer reads these states (readiness, liveness, the drain gate); the runtime
tracks every generation handed to the engine, so that at the shutdown deadline each
still-open one gets a final ``Failed(ShuttingDownError)``: its stream ends with an error
event and ``[DONE]``, its JSON request with a 503, instead of being cut mid-response.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from oai_audio_server.engine.types import Failed, GenerationHandle
from oai_audio_server.errors import ShuttingDownError

logger = logging.getLogger(__name__)

DRAIN_RETRY_AFTER_SECONDS = 5


def shutdown_error() -> ShuttingDownError:
    return ShuttingDownError(
        "the server is shutting down and could not finish this request before its "
        "shutdown deadline; retry it",
        retry_after_seconds=DRAIN_RETRY_AFTER_SECONDS,
    )


class Lifecycle:
    def __init__(self) -> None:
        self.draining = False
        self.cut_done = False
        self.fatal: str | None = None  # why the server must exit (the engine died)
        self.load_failure: str | None = None  # why the model never loaded (exit 1)
        self._lock = threading.Lock()
        self._open: weakref.WeakSet[Any] = weakref.WeakSet()
        self._fatal_hooks: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ generations

    def track(self, handles: Sequence[GenerationHandle]) -> None:
        with self._lock:
            for handle in handles:
                self._open.add(handle)

    def cut(self) -> int:
        """The drain deadline: end every open generation with a shutdown error. Runs on
        the event loop that reads the handles; returns how many were cut."""
        self.cut_done = True
        with self._lock:
            handles = list(self._open)
            self._open.clear()
        count = 0
        for handle in handles:
            put: Callable[[Any], None] | None = getattr(handle, "put", None)
            if put is not None and not getattr(handle, "cancelled", False):
                put(Failed(shutdown_error()))
                handle.cancel()  # the engine drops its row; the reader sees Failed first
                count += 1
        if count:
            logger.warning("shutdown deadline: %d unfinished generation(s) were cut", count)
        return count

    # ------------------------------------------------------------------ states

    def begin_drain(self) -> None:
        self.draining = True

    def on_fatal(self, hook: Callable[[], None]) -> None:
        self._fatal_hooks.append(hook)

    def engine_died(self, reason: str) -> None:
        """Called from any thread when the engine ends unexpectedly."""
        with self._lock:
            if self.fatal is not None:
                return
            self.fatal = reason
            hooks = list(self._fatal_hooks)
        self.draining = True
        logger.error("%s; the server exits (status 1) so that its supervisor restarts it", reason)
        for hook in hooks:
            try:
                hook()
            except Exception:
                logger.exception("fatal hook failed")

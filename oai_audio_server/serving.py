"""uvicorn's server with this server's stop rules.

* SIGTERM/SIGINT: the listener closes (uvicorn), new requests on open connections get
  503 with Retry-After (the drain gate), running ones may finish for --shutdown-timeout
  seconds; then every unfinished generation is ended with a shutdown error (a stream
  gets an error event and [DONE], a JSON request a 503) so that no reply is cut, and
  the process exits 0.
* The engine process died: /live turns 503 at once, the server stops the same way
  and the process exits 1, so that its supervisor (systemd, Kubernetes, Docker's
  restart policy, Ray Serve) starts a fresh one with a fresh engine.
* The model failed to load at start: the server stops and exits 1; the CLI prints the
  one-line cause. A server that never served has nothing to drain, and a supervisor
  sees the failure instead of a process that answers 503 forever.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn

from oai_audio_server.runtime import Runtime, one_line

logger = logging.getLogger(__name__)

# uvicorn's own graceful timeout is a backstop behind the drain deadline: by then every
# reply has had its error event, and the connections close by themselves.
BACKSTOP_SECONDS = 1
EXIT_FOR_RESTART = 1
# How often the start watches for the load's outcome (uvicorn polls its exit flag so too).
LOAD_POLL_SECONDS = 0.1


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime, drain_seconds: float) -> None:
        super().__init__(config)
        self._runtime = runtime
        self._drain_seconds = max(0.0, drain_seconds)
        self._loop: asyncio.AbstractEventLoop | None = None
        runtime.lifecycle.on_fatal(self._exit_for_restart)

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        watch = asyncio.create_task(self._watch_load())
        try:
            await super().serve(sockets)
        finally:
            watch.cancel()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if sockets and self.started:  # uvicorn says where it listens only for its own
            host, port = sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            logger.info("listening on http://%s:%d (CTRL+C to stop)", shown, port)

    async def _watch_load(self) -> None:
        """Until the model is ready: a load that fails stops the server (exit status 1)."""
        engine = self._runtime.engine
        while not self.should_exit and not engine.ready:
            error = engine.load_error
            if error is not None:
                self._runtime.lifecycle.load_failure = one_line(error)
                self.should_exit = True
                return
            await asyncio.sleep(LOAD_POLL_SECONDS)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit and self._loop is not None:
            self._loop.call_soon_threadsafe(self._begin_drain)
        super().handle_exit(sig, frame)

    def _begin_drain(self) -> None:
        assert self._loop is not None
        lifecycle = self._runtime.lifecycle
        if lifecycle.draining:
            return
        lifecycle.begin_drain()
        logger.info(
            "shutting down: new requests get 503; running ones have %g s to finish",
            self._drain_seconds,
        )
        self._loop.call_later(self._drain_seconds, lifecycle.cut)

    def _exit_for_restart(self) -> None:
        """From the engine's reader thread: uvicorn polls the flag every 0.1 s."""
        self.should_exit = True

    @property
    def exit_code(self) -> int:
        lifecycle = self._runtime.lifecycle
        failed = lifecycle.fatal is not None or lifecycle.load_failure is not None
        return EXIT_FOR_RESTART if failed else 0


def graceful_timeout(drain_seconds: float) -> int:
    return int(max(0.0, drain_seconds)) + 1 + BACKSTOP_SECONDS

"""uvicorn's server with this server's stop rules.

* SIGTERM/SIGINT: the listener closes (uvicorn), new requests on open connections get
  503 with Retry-After (the drain gate), running ones may finish for --shutdown-timeout
  seconds; then every unfinished generation is ended with a shutdown error (a stream
  gets an error event and [DONE], a JSON request a 503) so that no reply is cut, and
  the process exits 0.
* The engine process died: /live turns 503 at once, the server stops the same way
  and the process exits 1, so that its supervisor (systemd, Kubernetes, Docker's
  restart policy, Ray Serve) starts a fresh one with a fresh engine.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn

from oai_audio_server.runtime import Runtime

logger = logging.getLogger(__name__)

# uvicorn's own graceful timeout is a backstop behind the drain deadline: by then every
# reply has had its error event, and the connections close by themselves.
BACKSTOP_SECONDS = 1
EXIT_FOR_RESTART = 1


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime, drain_seconds: float) -> None:
        super().__init__(config)
        self._runtime = runtime
        self._drain_seconds = max(0.0, drain_seconds)
        self._loop: asyncio.AbstractEventLoop | None = None
        runtime.lifecycle.on_fatal(self._exit_for_restart)

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

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
        return EXIT_FOR_RESTART if self._runtime.lifecycle.fatal is not None else 0


def graceful_timeout(drain_seconds: float) -> int:
    return int(max(0.0, drain_seconds)) + 1 + BACKSTOP_SECONDS

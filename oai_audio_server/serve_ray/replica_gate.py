"""ASGI wrapper of the server inside a Serve replica.

* Lifespan: startup completes only once the model is loaded, so Serve counts the
  replica as running (and sends it requests) only then; a model that fails to load, or
  takes longer than ``load_timeout`` seconds, fails the startup and Serve retries.
* HTTP: every reply names the replica that made it (``x-oas-replica``), which tells
  apart replicas behind the proxy in logs, load tests and bug reports.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from litestar.types import ASGIApp, Message, Receive, Scope, Send

REPLICA_HEADER = b"x-oas-replica"
POLL_SECONDS = 0.1


class LoadState(Protocol):
    @property
    def ready(self) -> bool: ...

    @property
    def load_error(self) -> BaseException | None: ...


async def wait_loaded(engine: LoadState, timeout: float) -> str | None:
    """None once the model is loaded; else why it will not be."""
    deadline = time.monotonic() + timeout
    while not engine.ready:
        if engine.load_error is not None:
            return f"the model failed to load: {engine.load_error}"
        if time.monotonic() >= deadline:
            return f"the model was not loaded after {timeout:.0f} s"
        await asyncio.sleep(POLL_SECONDS)
    return None


class ReplicaGate:
    def __init__(
        self, app: ASGIApp, engine: LoadState, replica: str, load_timeout: float
    ) -> None:
        self._app = app
        self._engine = engine
        self._replica = replica.encode()
        self._load_timeout = load_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._app(scope, receive, self._lifespan_send(send))
        elif scope["type"] == "http":
            await self._app(scope, receive, self._http_send(send))
        else:
            await self._app(scope, receive, send)

    def _lifespan_send(self, send: Send) -> Send:
        async def gated(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                problem = await wait_loaded(self._engine, self._load_timeout)
                if problem is not None:
                    failed: Any = {"type": "lifespan.startup.failed", "message": problem}
                    await send(failed)
                    return
            await send(message)

        return gated

    def _http_send(self, send: Send) -> Send:
        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), (REPLICA_HEADER, self._replica)]
                message = {**message, "headers": headers}
            await send(message)

        return named

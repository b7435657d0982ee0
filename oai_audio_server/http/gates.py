"""ASGI wrappers around the app that guard the server as a whole.

* ``DrainGate``: once the server drains (SIGTERM) or is about to exit (the engine
  died), a new request gets a 503 with Retry-After instead of work that could not
  finish; requests already running are left alone. ``/live`` and ``/health`` pass:
  they report the state themselves.
* ``BodyDeadline``: a request body must arrive within --request-body-timeout seconds
  of the request's start, else 408 and the connection is closed, so that half-sent
  bodies cannot hold connections (and their buffers) open.
"""

from __future__ import annotations

import asyncio

from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send

from oai_audio_server.errors import RequestTimeoutError, ShuttingDownError
from oai_audio_server.http.asgi_reply import send_error
from oai_audio_server.runtime import Runtime

PROBES = frozenset({"/live", "/health"})


class DrainGate:
    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self._app = app
        self._runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lifecycle = self._runtime.lifecycle
        if scope["type"] == "http" and lifecycle.draining and scope["path"] not in PROBES:
            error = self._runtime.unready() or ShuttingDownError("the server is shutting down")
            await send_error(send, error, close=True)
            return
        await self._app(scope, receive, send)


class BodyTimeoutError(RequestTimeoutError):
    default_code = "request_body_timeout"


class BodyDeadline:
    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self._app = app
        self._seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._seconds <= 0:
            await self._app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._seconds
        body_done = False

        async def receive_in_time() -> ReceiveMessage:
            nonlocal body_done
            if body_done:
                return await receive()
            waiting = asyncio.ensure_future(receive())
            try:
                done, _ = await asyncio.wait({waiting}, timeout=max(0.0, deadline - loop.time()))
            finally:
                if not waiting.done():
                    waiting.cancel()
            if not done:
                error = BodyTimeoutError(
                    f"the request body did not arrive within {self._seconds:g} s (the "
                    "server's --request-body-timeout); send it at once, or a smaller one"
                )
                error.headers["Connection"] = "close"  # the rest of it is not waited for
                raise error
            message = waiting.result()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self._app(scope, receive_in_time, send)

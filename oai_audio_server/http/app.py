"""``create_app(runtime)``: the Litestar application, with no module-level state."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from litestar import Litestar

from oai_audio_server.http.errors import handle_exception
from oai_audio_server.http.routes import build_routes
from oai_audio_server.runtime import Runtime


def create_app(runtime: Runtime) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        runtime.start()  # the model loads in the engine thread; /health says when
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(runtime.close)

    return Litestar(
        route_handlers=build_routes(runtime),
        lifespan=[lifespan],
        exception_handlers={Exception: handle_exception},
        request_max_body_size=runtime.settings.max_body_bytes,
    )

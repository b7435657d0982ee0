"""``create_app(runtime)``: the Litestar application, with no module-level state."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from litestar import Litestar

from oai_audio_server.heap import freeze_long_lived_objects
from oai_audio_server.http.auth import api_key_guard
from oai_audio_server.http.cors import PreflightGate, cors_config
from oai_audio_server.http.docs import build_docs_routes, openapi_config
from oai_audio_server.http.errors import exception_handler
from oai_audio_server.http.gates import BodyDeadline, DrainGate
from oai_audio_server.http.metrics import ServerMetrics, build_metrics_routes
from oai_audio_server.http.realtime_routes import build_realtime_routes
from oai_audio_server.http.request_log import RequestTracker, log_request
from oai_audio_server.http.routes import build_routes
from oai_audio_server.http.transcription_routes import build_transcription_routes
from oai_audio_server.http.tutorial_routes import build_tutorial_routes
from oai_audio_server.runtime import Runtime
from oai_audio_server.webui import build_web_ui_routes, exempt_web_ui


def create_app(runtime: Runtime) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        runtime.start()  # the model loads in the engine thread; /health says when
        freeze_long_lived_objects()
        metrics.loop_watch.start()
        try:
            yield
        finally:
            await metrics.loop_watch.stop()
            await anyio.to_thread.run_sync(runtime.close)

    settings = runtime.settings
    metrics = ServerMetrics(runtime)
    cors = cors_config(settings)
    app = Litestar(
        route_handlers=build_routes(runtime)
        + build_tutorial_routes(runtime)
        + build_metrics_routes(metrics)
        + build_docs_routes(settings)
        + build_transcription_routes(runtime)
        + build_realtime_routes(runtime)
        + build_web_ui_routes(),
        lifespan=[lifespan],
        exception_handlers={Exception: exception_handler(settings)},
        request_max_body_size=runtime.settings.max_body_bytes,
        guards=[exempt_web_ui(api_key_guard(settings.api_key))] if settings.api_key else [],
        cors_config=cors,
        openapi_config=openapi_config(settings),
        logging_config=None,  # the CLI configures logging (text or JSON lines)
    )
    # Outside Litestar's own stack, so unmatched routes and preflights are tracked too.
    gated = DrainGate(BodyDeadline(PreflightGate(app.asgi_handler, cors),
                                   settings.request_body_timeout), runtime)
    app.asgi_handler = RequestTracker(gated, sinks=[metrics.observe, log_request])
    return app

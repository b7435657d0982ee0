"""Routes for chat completions, models and health."""

from __future__ import annotations

import time
from typing import Any

from litestar import Request, Response, get, head, post
from litestar.enums import MediaType
from litestar.response import Stream

from oai_audio_server.chat.service import ChatService, check_model
from oai_audio_server.errors import EngineError
from oai_audio_server.http.auth import has_api_key
from oai_audio_server.http.body import read_json
from oai_audio_server.http.disconnect import ClientDisconnected, unless_disconnected
from oai_audio_server.http.errors import error_response
from oai_audio_server.http.request_log import current_record
from oai_audio_server.protocol import (
    ModelCard,
    ModelList,
    chat_request_decoder,
    json_encoder,
)
from oai_audio_server.runtime import Runtime

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def json_response(payload: Any, status_code: int = 200) -> Response[bytes]:
    return Response(
        content=json_encoder.encode(payload), status_code=status_code, media_type="application/json"
    )


def build_routes(runtime: Runtime) -> list[Any]:
    settings = runtime.settings
    chat = ChatService(settings, runtime)
    started = int(time.time())

    @post(
        "/v1/chat/completions",
        status_code=200,
        summary="Create a chat completion (JSON or SSE stream)",
    )
    async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
        decoded = await read_json(runtime, request, chat_request_decoder)
        chat_request = decoded.value
        prepared = await chat.prepare(chat_request, decoded.long_strings.resolve)
        record = current_record(request.scope)  # gets tokens and TTFT for logs and metrics
        if chat_request.stream:
            record.stream = True
            handles = chat.submit(prepared)
            options = chat_request.stream_options
            events = chat.stream(
                prepared,
                handles,
                include_usage=bool(options and options.include_usage),
                observer=record,
            )
            return Stream(events, media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            completion = await unless_disconnected(request, chat.complete(prepared, record))
        except ClientDisconnected:
            return Response(content=b"", status_code=499)
        return json_response(completion)

    @get("/v1/models", summary="List the served model")
    async def list_models() -> Response[bytes]:
        cards = [ModelCard(id=name, created=started) for name in settings.served_names]
        return json_response(ModelList(data=cards))

    @get("/v1/models/{model_id:path}", summary="Describe the served model")
    async def get_model(model_id: str) -> Response[bytes]:
        # A path parameter, so ids with a slash (qwen/Qwen-Audio-Chat) work.
        name = check_model(settings, model_id.lstrip("/"))
        return json_response(ModelCard(id=name, created=started))

    @get(
        "/health",
        summary="Readiness: 200 once the model is loaded, 503 before, when the load "
        "failed, while shutting down, and after an engine crash",
    )
    async def health(request: Request[Any, Any, Any]) -> Response[Any]:
        problem = runtime.unready()
        if problem is not None:
            return error_response(problem)
        if not has_api_key(request.headers.get("authorization"), settings.api_key):
            return json_response({"status": "ok"})  # counters only with the key
        # Every engine figure is a count; JSON readers expect integers, not 3.0.
        counts = {name: int(value) for name, value in runtime.engine.stats().items()}
        return json_response({"status": "ok", **counts})

    @get("/live", summary="Liveness: 200 while the process serves HTTP; 503 once the "
         "engine has died and the process is about to exit")
    async def live() -> Response[Any]:
        if runtime.lifecycle.fatal is not None:
            return error_response(EngineError(
                f"{runtime.lifecycle.fatal}; the server is exiting so that its supervisor "
                "restarts it", code="engine_stopped", status=503,
            ))
        return json_response({"status": "alive"})

    # Uptime checkers often probe with HEAD: the same statuses, without a body.
    @head("/health", summary="Readiness, without a body")
    async def health_head() -> Response[None]:
        problem = runtime.unready()
        if problem is None:
            return _no_body(200)
        return _no_body(problem.status, headers=problem.headers)

    @head("/live", summary="Liveness, without a body")
    async def live_head() -> Response[None]:
        return _no_body(503 if runtime.lifecycle.fatal is not None else 200)

    return [chat_completions, list_models, get_model, health, live, health_head, live_head]


def _no_body(status: int, headers: dict[str, str] | None = None) -> Response[None]:
    # A JSON media type would render None as "null" (Content-Length 4 on a HEAD reply).
    return Response(content=None, status_code=status, headers=headers, media_type=MediaType.TEXT)

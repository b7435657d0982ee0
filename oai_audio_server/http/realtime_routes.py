"""``GET /v1/realtime``: OpenAI's Realtime API as a WebSocket (Litestar's own support).

The route only does what needs the socket: the Origin (browsers apply no CORS to
WebSockets), the API key (a Bearer header, or the browser's
``openai-insecure-api-key.KEY`` subprotocol, since browsers cannot set headers on a
WebSocket), the sessions-per-server and session-length limits, one writer
task that sends events in order, and reading client messages into the session
(``oai_audio_server.realtime.session``). A refused connection is still accepted, so the
client gets an ``error`` event that says why, and is then closed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

from litestar import WebSocket, websocket

from oai_audio_server.chat.service import check_model
from oai_audio_server.errors import (
    APIError,
    AuthenticationError,
    InvalidRequestError,
    OverloadedError,
    PermissionDeniedError,
)
from oai_audio_server.http.auth import OWN_AUTH, bearer_token
from oai_audio_server.realtime import protocol as wire
from oai_audio_server.realtime.errors import SessionLimitError, error_detail
from oai_audio_server.realtime.session import Kind, RealtimeSession
from oai_audio_server.runtime import Runtime
from oai_audio_server.transcription.service import TranscriptionService

logger = logging.getLogger(__name__)

KEY_SUBPROTOCOL = "openai-insecure-api-key."
REALTIME_SUBPROTOCOL = "realtime"
OUTGOING_EVENTS = 256  # queued for the writer; a producer waits beyond this
FLUSH_SECONDS = 5.0  # for a closing session's last events
# Close codes (RFC 6455): policy violation, and "try again later".
CLOSE_POLICY = 1008
CLOSE_TRY_LATER = 1013
CLOSE_NORMAL = 1000


class SessionSlots:
    """How many sessions are open, against --realtime-max-sessions."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def take(self) -> bool:
        if self.open >= self.limit:
            return False
        self.open += 1
        return True

    def give_back(self) -> None:
        self.open -= 1


def offered_key(scope: Any, authorization: str | None) -> str | None:
    token = bearer_token(authorization)
    if token is not None:
        return token
    for protocol in scope.get("subprotocols") or ():
        if protocol.startswith(KEY_SUBPROTOCOL):
            return protocol[len(KEY_SUBPROTOCOL) :]
    return None


def key_error(scope: Any, authorization: str | None, api_key: str | None) -> APIError | None:
    if api_key is None:
        return None
    key = offered_key(scope, authorization)
    if key is None:
        return AuthenticationError(
            "You didn't provide an API key. Send 'Authorization: Bearer <key>', or from a "
            f"browser the subprotocol '{KEY_SUBPROTOCOL}<key>'.",
            code="missing_api_key",
        )
    if not hmac.compare_digest(key.encode(), api_key.encode()):
        return AuthenticationError("Incorrect API key provided.", code="invalid_api_key")
    return None


def origin_error(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> APIError | None:
    """Browsers send Origin on a WebSocket handshake but apply no CORS to it, so any site
    could otherwise read a keyless server's sessions: only the server's own page and
    --allowed-origins may connect. Clients that send no Origin (SDKs, tools) pass."""
    if origin is None or "*" in allowed or origin in allowed:
        return None
    if origin.partition("://")[2] == (host or ""):
        return None  # the page this server serves
    return PermissionDeniedError(
        f"WebSocket connections from the origin {origin!r} are not allowed; add it to "
        "--allowed-origins",
        code="cors_origin_not_allowed",
    )


class Writer:
    """Sends events in the order they were made, from one task; gone quiet once the
    client is gone (producers never wait on a dead socket)."""

    def __init__(self, socket: WebSocket[Any, Any, Any]) -> None:
        self._socket = socket
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(OUTGOING_EVENTS)
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while (data := await self._queue.get()) is not None:
            await self._socket.send_data(data.decode(), mode="text")

    async def emit(self, event: wire.ServerEvent) -> None:
        if not self._task.done():
            await self._queue.put(wire.encoder.encode(event))

    async def flush(self) -> None:
        """Everything queued sent, or the client gone; a client that has stopped reading
        gets FLUSH_SECONDS before the rest is dropped."""
        if not self._task.done():
            try:
                self._queue.put_nowait(None)
            except asyncio.QueueFull:
                pass  # the writer is stalled on a client that does not read
        await asyncio.wait({self._task}, timeout=FLUSH_SECONDS)
        if not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task})
        if not self._task.cancelled():
            self._task.exception()  # a send to a closed socket: nothing more to do


def build_realtime_routes(runtime: Runtime) -> list[Any]:
    settings = runtime.settings
    transcriber = TranscriptionService(settings, runtime)
    slots = SessionSlots(settings.realtime_max_sessions)

    async def refuse(socket: WebSocket[Any, Any, Any], error: APIError, code: int) -> None:
        event = wire.ErrorEvent(error=error_detail(error))
        await socket.send_data(wire.encoder.encode(event).decode(), mode="text")
        await socket.close(code=code, reason=error.code or "")

    def choose(query: Any) -> tuple[Kind, str]:
        intent = query.get("intent")
        if intent not in (None, "transcription", "conversation"):
            raise InvalidRequestError(
                f"intent {intent!r} is not supported; use intent=transcription or leave it "
                "out for a conversation",
                param="intent",
                code="invalid_value",
            )
        kind: Kind = "transcription" if intent == "transcription" else "realtime"
        model = query.get("model") or settings.model_name
        if kind == "realtime":
            check_model(settings, model)
        return kind, model

    async def serve(socket: WebSocket[Any, Any, Any], session: RealtimeSession) -> None:
        while True:
            message = await socket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("text")
            if not isinstance(data, str):
                await session.handle_error(
                    InvalidRequestError(
                        "binary frames are not events: send each event as a JSON text frame",
                        code="invalid_json",
                    )
                )
                continue
            await session.handle(data)

    async def serve_until_expired(
        socket: WebSocket[Any, Any, Any], session: RealtimeSession
    ) -> None:
        """The whole session is timed, not only its reads: a session stalled on sending
        (a client that stops reading) ends at its deadline too."""
        seconds = settings.realtime_max_session_seconds
        try:
            await asyncio.wait_for(serve(socket, session), seconds)
        except asyncio.TimeoutError:
            raise SessionLimitError(
                f"the session reached its maximum length of {seconds:g} s "
                "(--realtime-max-session-seconds); open a new one",
                code="session_expired",
            ) from None

    @websocket("/v1/realtime", opt={OWN_AUTH: True})
    async def realtime(socket: WebSocket[Any, Any, Any]) -> None:
        offered = socket.scope.get("subprotocols") or []
        await socket.accept(
            subprotocols=REALTIME_SUBPROTOCOL if REALTIME_SUBPROTOCOL in offered else None
        )
        problem = origin_error(
            socket.headers.get("origin"), socket.headers.get("host"), settings.allowed_origins
        ) or key_error(socket.scope, socket.headers.get("authorization"), settings.api_key)
        if problem is not None:
            await refuse(socket, problem, CLOSE_POLICY)
            return
        unready = runtime.unready()
        if unready is not None:
            await refuse(socket, unready, CLOSE_TRY_LATER)
            return
        try:
            kind, model = choose(socket.query_params)
        except APIError as bad_query:
            await refuse(socket, bad_query, CLOSE_POLICY)
            return
        if not slots.take():
            full = OverloadedError(
                f"this server holds at most {slots.limit} realtime sessions at once "
                "(--realtime-max-sessions); retry later"
            )
            full.code = "too_many_sessions"
            await refuse(socket, full, CLOSE_TRY_LATER)
            return
        writer = Writer(socket)
        session = RealtimeSession(settings, runtime, transcriber, kind, model, writer.emit)
        close_code, reason = CLOSE_NORMAL, ""
        try:
            await writer.emit(wire.SessionCreated(session=session.wire_session()))
            await serve_until_expired(socket, session)
        except SessionLimitError as limit:
            await writer.emit(wire.ErrorEvent(error=error_detail(limit)))
            close_code, reason = CLOSE_POLICY, limit.code or ""
        finally:
            await session.close()  # every task cancelled: no row stays in the batch
            slots.give_back()
            await writer.flush()
        if socket.connection_state != "disconnect":
            try:
                await socket.close(code=close_code, reason=reason)
            except Exception:  # the client went away meanwhile
                logger.debug("realtime close after disconnect", exc_info=True)

    return [realtime]

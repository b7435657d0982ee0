"""What one HTTP request did, and the single log line written when it ends.

``RequestTracker`` wraps Litestar's whole ASGI handler rather than being a route
middleware, because Litestar runs route middleware only for matched routes: wrapped
outside, 404s, 405s, guard refusals and CORS preflights are logged and counted too.
The record lives in the request's ASGI scope state; routes pass it to the chat service
as its :class:`~oai_audio_server.chat.observer.GenerationObserver`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from oai_audio_server.errors import APIError
from oai_audio_server.protocol import Usage

REQUEST_ID_HEADER = b"x-request-id"
STATE_KEY = "oas_request"
UNMATCHED_ROUTE = "<unmatched>"

logger = logging.getLogger(__name__)
request_logger = logging.getLogger("oai_audio_server.requests")


@dataclass
class RequestRecord:
    request_id: str
    method: str
    path: str
    started: float  # time.monotonic() when the request arrived
    route: str = UNMATCHED_ROUTE
    status: int = 0
    stream: bool = False
    latency_seconds: float = 0.0
    first_token_seconds: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    audio_seconds: float | None = None
    # A stream that ended with an error event after its 200 went out: its code.
    error_code: str | None = None

    # GenerationObserver: times count from the request's arrival, as the client sees them.
    def first_token(self) -> None:
        if self.first_token_seconds is None:
            self.first_token_seconds = time.monotonic() - self.started

    def finished(self, usage: Usage, audio_seconds: float) -> None:
        self.prompt_tokens = usage.prompt_tokens
        self.completion_tokens = usage.completion_tokens
        self.audio_seconds = audio_seconds

    def failed(self, error: APIError) -> None:
        self.error_code = error.code or error.error_type

    @property
    def outcome(self) -> str:
        """The status, or "cut" for a stream that ended with an error event (its 200
        was sent before the error): what the log line and the metrics show."""
        if self.error_code is not None and 200 <= self.status < 300:
            return "cut"
        return str(self.status)

    def fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "latency_ms": round(self.latency_seconds * 1000, 1),
        }
        if self.error_code is not None:
            fields["outcome"] = self.outcome
            fields["error_code"] = self.error_code
        if self.prompt_tokens is not None:
            fields["prompt_tokens"] = self.prompt_tokens
            fields["completion_tokens"] = self.completion_tokens
        if self.audio_seconds is not None:
            fields["audio_seconds"] = round(self.audio_seconds, 3)
        if self.first_token_seconds is not None:
            fields["ttft_ms"] = round(self.first_token_seconds * 1000, 1)
        return fields


def current_record(scope: Scope) -> RequestRecord:
    """The record of the request in ``scope``; a detached one when no tracker runs."""
    state = scope.get("state")
    record = state.get(STATE_KEY) if isinstance(state, dict) else None
    if isinstance(record, RequestRecord):
        return record
    return RequestRecord(
        request_id=uuid.uuid4().hex,
        method=str(scope.get("method", "")),
        path=str(scope.get("path", "")),
        started=time.monotonic(),
    )


RecordSink = Callable[[RequestRecord], None]


class RequestTracker:
    """ASGI wrapper: a record per HTTP request, an ``x-request-id`` reply header, and the
    finished record handed to each sink (request log, metrics)."""

    def __init__(self, app: ASGIApp, sinks: Sequence[RecordSink]) -> None:
        self._app = app
        self._sinks = tuple(sinks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        record = RequestRecord(
            request_id=uuid.uuid4().hex,
            method=str(scope.get("method", "")),
            path=scope["path"],
            started=time.monotonic(),
        )
        scope.setdefault("state", {})[STATE_KEY] = record
        request_id = record.request_id.encode()

        finished = False

        def finish() -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            record.latency_seconds = time.monotonic() - record.started
            record.route = str(scope.get("path_template") or UNMATCHED_ROUTE)
            for sink in self._sinks:
                try:
                    sink(record)
                except Exception:  # a broken sink must not break the reply
                    logger.exception("request sink failed")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = [*message.get("headers", ()), (REQUEST_ID_HEADER, request_id)]
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # Recorded before the reply's last bytes go out, so a client that reads
                # /metrics or the log right after its reply finds its request there.
                finish()
            await send(message)

        try:
            await self._app(scope, receive, send_with_id)
        except BaseException:
            if record.status == 0:
                record.status = 500
            raise
        finally:
            finish()  # a reply that never completed (client gone, failure)


def log_request(record: RequestRecord) -> None:
    """The one line per request; the fields ride along for the JSON formatter."""
    fields = record.fields()
    text = " ".join(
        [f"{record.request_id} {record.method} {record.path} {record.outcome}"]
        + [f"{key}={value}" for key, value in fields.items() if key not in _IN_PREFIX]
    )
    level = logging.DEBUG if record.path in PROBE_PATHS else logging.INFO
    request_logger.log(level, text, extra={"request": fields})


# Load balancers, uptime checkers and Prometheus call these every few seconds: at INFO
# they would bury the requests that matter.
PROBE_PATHS = frozenset({"/health", "/live", "/metrics"})
_IN_PREFIX = frozenset({"request_id", "method", "path", "status", "outcome"})

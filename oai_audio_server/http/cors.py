"""CORS for browser chat UIs: off unless ``--allowed-origins`` lists origins (or ``*``)."""

from __future__ import annotations

from litestar.config.cors import CORSConfig
from litestar.types import ASGIApp, Receive, Scope, Send

from oai_audio_server.errors import PermissionDeniedError
from oai_audio_server.http.asgi_reply import send_error
from oai_audio_server.http.request_log import REQUEST_ID_HEADER
from oai_audio_server.settings import Settings


def cors_config(settings: Settings) -> CORSConfig | None:
    if not settings.allowed_origins:
        return None
    return CORSConfig(
        allow_origins=list(settings.allowed_origins),
        allow_methods=["GET", "POST", "OPTIONS"],
        # Browsers ask to send Authorization and Content-Type (and SDK headers such as
        # x-stainless-*); the key itself is checked on the real request, not the preflight.
        allow_headers=["*"],
        expose_headers=[REQUEST_ID_HEADER.decode(), "Retry-After", "x-should-retry"],
        allow_credentials=False,
        max_age=600,
    )


class PreflightGate:
    """Refuses a preflight from an origin that --allowed-origins does not list with the
    usual JSON error body (Litestar's CORS middleware answers it in plain text)."""

    def __init__(self, app: ASGIApp, config: CORSConfig | None) -> None:
        self._app = app
        self._config = config  # the CORS middleware's own: the same origin rule

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        config = self._config
        if config is not None and scope["type"] == "http" and scope.get("method") == "OPTIONS":
            headers = dict(scope["headers"])
            origin = headers.get(b"origin", b"").decode("latin-1")
            preflight = b"access-control-request-method" in headers
            if preflight and origin and not config.is_origin_allowed(origin):
                await send_error(send, PermissionDeniedError(
                    f"the origin {origin} may not call this server from a browser; the "
                    "operator lists allowed origins in --allowed-origins",
                    code="cors_origin_not_allowed",
                ))
                return
        await self._app(scope, receive, send)


"""CORS for browser chat UIs: off unless ``--allowed-origins`` lists origins (or ``*``)."""

from __future__ import annotations

from litestar.config.cors import CORSConfig

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

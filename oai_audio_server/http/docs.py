"""The OpenAPI schema at ``/openapi.json`` and a Swagger UI page at ``/docs``."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from oai_audio_server import __version__
from oai_audio_server.http.auth import DOCS_PATH
from oai_audio_server.settings import Settings

DESCRIPTION = (
    "OpenAI-compatible server for Qwen-Audio-Chat: chat completions with audio input "
    "(JSON and server-sent events), models, health, metrics, and the tutorial script's "
    "routes. When the server has an API key, send it as 'Authorization: Bearer <key>'."
)


def openapi_config(settings: Settings) -> OpenAPIConfig:
    secured = settings.api_key is not None
    return OpenAPIConfig(
        title="oai-audio-server",
        version=__version__,
        description=DESCRIPTION,
        # The docs router lives under /docs; the schema is also served at /openapi.json
        # (below) where OpenAI-style tooling looks for it. A router at "/" would add a
        # catch-all route and swallow our OpenAI-shaped 404s.
        path=DOCS_PATH,
        render_plugins=[SwaggerRenderPlugin(path="/")],
        components=Components(
            security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}
        )
        if secured
        else Components(),
        security=[{"bearer": []}] if secured else None,
    )


def build_docs_routes() -> list[Any]:
    @get("/openapi.json", include_in_schema=False, summary="The OpenAPI schema")
    async def openapi_schema(request: Request[Any, Any, Any]) -> Response[Any]:
        schema = request.app.openapi_schema.to_schema()
        return Response(content=schema, media_type="application/json")

    return [openapi_schema]

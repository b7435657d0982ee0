"""The OpenAPI document at ``/openapi.json`` (and ``/docs/openapi.json``) and a docs
page at ``/docs``: a page of this package that renders the document in the browser,
with no script or style from anywhere else, so it works offline."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.enums import MediaType
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import OpenAPIRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from oai_audio_server import __version__
from oai_audio_server.http.auth import DOCS_PATH
from oai_audio_server.http.openapi_doc import complete_schema
from oai_audio_server.settings import Settings

DESCRIPTION = (
    "OpenAI-compatible server for Qwen-Audio-Chat: chat completions with audio input "
    "(JSON and server-sent events), transcriptions and translations, models, health, "
    "metrics, and the tutorial script's routes. When the server has an API key, send it "
    "as 'Authorization: Bearer <key>'. Every error is OpenAI's error body."
)


@cache
def docs_page() -> bytes:
    return resources.files("oai_audio_server.http").joinpath("docs_page.html").read_bytes()


class DocsPage(OpenAPIRenderPlugin):
    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        return docs_page()


class CompletedSchema(OpenAPIRenderPlugin):
    """Litestar's own schema route, serving the completed document."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(path="/openapi.json", media_type=MediaType.JSON)
        self._settings = settings

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        return served_schema(request, self._settings)


def served_schema(request: Request[Any, Any, Any], settings: Settings) -> bytes:
    state = request.app.state
    cached = state.get("oas_openapi")
    if cached is None:
        generated = request.app.openapi_schema.to_schema()
        cached = msgspec.json.encode(complete_schema(generated, settings))
        state["oas_openapi"] = cached
    return bytes(cached)


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
        render_plugins=[DocsPage(path="/"), CompletedSchema(settings)],
        components=Components(
            security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}
        )
        if secured
        else Components(),
        security=[{"bearer": []}] if secured else None,
    )


def build_docs_routes(settings: Settings) -> list[Any]:
    @get("/openapi.json", include_in_schema=False, summary="The OpenAPI schema")
    async def openapi_schema(request: Request[Any, Any, Any]) -> Response[bytes]:
        return Response(content=served_schema(request, settings), media_type="application/json")

    return [openapi_schema]

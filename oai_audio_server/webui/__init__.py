"""The built-in web page: ``GET /`` redirects to ``/ui/``, which serves a few static files
shipped in this package (``static/``). No build step, no outside requests.

The page talks to the server only through the public API (``/v1/...`` and ``/health``),
with the API key the user types into it (kept in the browser's localStorage and sent in
the ``Authorization`` header). The page itself holds nothing secret, so its routes are
open without a key: :func:`exempt_web_ui` wraps the API-key guard to let them through.
"""

from __future__ import annotations

import inspect
from importlib import resources
from typing import Any

from litestar import Request, Response, get
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.response import Redirect
from litestar.types import Guard

from oai_audio_server.errors import NotFoundError

UI_PATH = "/ui"
PUBLIC_OPT = "web_ui_public"  # route handler opt: served without the API key

_MEDIA_TYPES = {
    # Litestar adds "; charset=utf-8" to text/* types itself.
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}

# The page may load and connect only to this server: no CDN, fonts or analytics, even by
# mistake. blob: for the players of recorded or picked audio and the downloads.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files; revalidate so an upgraded server never runs a stale script.
    "Cache-Control": "no-cache",
}


def load_static_files() -> dict[str, bytes]:
    """Every file of ``static/`` by name, read once (they are a few tens of KiB)."""
    folder = resources.files(__package__).joinpath("static")
    return {
        entry.name: entry.read_bytes()
        for entry in folder.iterdir()
        if entry.is_file() and "." + entry.name.rsplit(".", 1)[-1] in _MEDIA_TYPES
    }


def build_web_ui_routes() -> list[Any]:
    files = load_static_files()

    def serve(name: str) -> Response[bytes]:
        content = files.get(name)
        if content is None:  # only names from the fixed set: never a path on disk
            raise NotFoundError(f"no file {name!r} in the web UI", code="not_found")
        media_type = _MEDIA_TYPES["." + name.rsplit(".", 1)[-1]]
        return Response(content=content, media_type=media_type, headers=_HEADERS)

    opt = {PUBLIC_OPT: True}

    @get("/", include_in_schema=False, opt=opt)
    async def root() -> Redirect:
        return Redirect(path=UI_PATH + "/", status_code=302)

    @get(UI_PATH, include_in_schema=False, opt=opt)
    async def page(request: Request[Any, Any, Any]) -> Response[Any]:
        # Litestar routes /ui and /ui/ here (and normalises scope["path"]); the page's
        # relative links need the slash, so look at the path as the client sent it.
        raw_path = request.scope.get("raw_path")
        if raw_path is not None and not raw_path.endswith(b"/"):
            return Redirect(path=UI_PATH + "/", status_code=302)
        return serve("index.html")

    @get(UI_PATH + "/{name:str}", include_in_schema=False, opt=opt)
    async def static_file(name: str) -> Response[bytes]:
        return serve(name)

    return [root, page, static_file]


def exempt_web_ui(guard: Guard) -> Guard:
    """``guard`` for every route except the web UI's static files."""

    async def guarded(
        connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
    ) -> None:
        if handler.opt.get(PUBLIC_OPT):
            return
        result = guard(connection, handler)
        if inspect.isawaitable(result):
            await result

    return guarded


__all__ = ["UI_PATH", "build_web_ui_routes", "exempt_web_ui", "load_static_files"]

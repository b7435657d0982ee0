"""API-key authentication: a Litestar guard that wants ``Authorization: Bearer <key>``.

Open without a key: readiness and liveness probes (``/health``, ``/live``, so load
balancers and orchestrators need no secret), the OpenAPI schema and docs page
(``/openapi.json``, ``/docs``: they describe the API, they do not use it), and every
``OPTIONS`` request (browsers send CORS preflights without credentials; Litestar's CORS
layer answers those before routing, and plain ``OPTIONS`` only lists allowed methods).
Everything else, ``/metrics`` included, needs the key.
"""

from __future__ import annotations

import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from oai_audio_server.errors import AuthenticationError

DOCS_PATH = "/docs"
PUBLIC_ROUTES = frozenset({"/health", "/live", "/openapi.json"})
# Route handler opt: the handler checks the key itself (the realtime WebSocket, whose
# browser clients send it as a subprotocol and must get the refusal as an event).
OWN_AUTH = "checks_own_api_key"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def is_public(scope: Any) -> bool:
    if scope.get("method") == "OPTIONS":
        return True
    template = scope.get("path_template") or scope.get("path", "")
    under_docs = template == DOCS_PATH or template.startswith(DOCS_PATH + "/")
    return template in PUBLIC_ROUTES or under_docs


def has_api_key(authorization: str | None, api_key: str | None) -> bool:
    """Whether the header carries the key (always true on a server without one)."""
    if api_key is None:
        return True
    token = bearer_token(authorization)
    return token is not None and hmac.compare_digest(token.encode(), api_key.encode())


def api_key_guard(api_key: str) -> Guard:
    expected = api_key.encode()

    def require_api_key(
        connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
    ) -> None:
        if is_public(connection.scope) or handler.opt.get(OWN_AUTH):
            return
        token = bearer_token(connection.headers.get("authorization"))
        if token is None:
            raise AuthenticationError(
                "You didn't provide an API key. Send it in the Authorization header as "
                "'Authorization: Bearer <key>'."
            )
        # Constant-time comparison, so response timing does not reveal the key prefix.
        if not hmac.compare_digest(token.encode(), expected):
            raise AuthenticationError("Incorrect API key provided.")

    return require_api_key

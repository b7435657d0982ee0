"""One mapping from exceptions to OpenAI error bodies, by exception type."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from oai_audio_server.errors import (
    APIError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
)
from oai_audio_server.protocol import CONTENT_PART_TYPES
from oai_audio_server.settings import Settings, limit_name
from oai_audio_server.units import format_value

logger = logging.getLogger(__name__)

_PATH = re.compile(r"`\$\.?([^`]*)`")
_FIELD = re.compile(r"required field `([^`]+)`")
# Where a content part's tag sits: a value there that fails is an unknown part type.
_PART_TYPE = re.compile(r"messages\[\d+\]\.content\[\d+\]\.type")


def validation_error(exc: msgspec.ValidationError | msgspec.DecodeError) -> InvalidRequestError:
    """msgspec says '... - at `$.messages[0].content`'; OpenAI's param is the path."""
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return InvalidRequestError(f"the request body is not valid JSON: {text}")
    where = _PATH.search(text)
    param = where.group(1) if where else None
    missing = _FIELD.search(text)
    if missing:
        param = f"{param}.{missing.group(1)}" if param else missing.group(1)
    if param and _PART_TYPE.fullmatch(param):
        return InvalidRequestError(
            "unsupported content part type; this server accepts "
            + ", ".join(f"'{kind}'" for kind in CONTENT_PART_TYPES)
            + " parts (audio as input_audio, an audio_url, or a file part whose file_data "
            "is a data:audio/... URI)",
            param=param,
            code="unsupported_content_type",
        )
    return InvalidRequestError(f"invalid request: {text}", param=param or None)


def decode_body(body: bytes | memoryview, decoder: msgspec.json.Decoder[Any]) -> Any:
    if isinstance(body, bytes) and not body.strip():
        raise InvalidRequestError("the request body is empty; send a JSON object")
    try:
        return decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise validation_error(exc) from None
    except UnicodeDecodeError:
        raise InvalidRequestError("the request body is not valid UTF-8 JSON") from None
    except RecursionError:
        raise InvalidRequestError("the request body's JSON is nested too deeply") from None


def error_response(error: APIError) -> Response[Any]:
    return Response(
        content=error.to_body(),
        status_code=error.status,
        headers=error.headers,
        media_type="application/json",
    )


def _from_http_exception(
    request: Request[Any, Any, Any], exc: HTTPException, settings: Settings
) -> APIError:
    status = exc.status_code
    detail = str(exc.detail or "")
    where = f"{request.method} {request.url.path}"
    error: APIError
    if status == 404:
        error = NotFoundError(
            f"no route for {where}; /docs lists this server's routes", code="not_found"
        )
    elif status == 413:
        limit = settings.max_body_bytes
        error = PayloadTooLargeError(
            f"the request body is over this server's limit of {format_value(limit, 'bytes')} "
            f"({limit_name('max_body_bytes')}); send smaller or fewer audio files "
            "(base64 makes audio 4/3 of its file size)"
        )
    elif status == 405:
        allow = (exc.headers or {}).get("allow", "")
        methods = [m.strip() for m in allow.split(",") if m.strip() not in ("", "OPTIONS")]
        error = InvalidRequestError(
            f"{where} is not supported; use {' or '.join(methods) or 'another method'} "
            "for this path",
            code="method_not_allowed",
            status=405,
        )
    elif 400 <= status < 500:
        error = InvalidRequestError(detail or "bad request", status=status)
    else:
        error = APIError(detail or "internal server error")
    error.headers.update(exc.headers or {})  # Allow on a 405 (RFC 9110), Retry-After, ...
    return error


def exception_handler(
    settings: Settings,
) -> Callable[[Request[Any, Any, Any], Exception], Response[Any]]:
    def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        if isinstance(exc, APIError):
            error = exc
        elif isinstance(exc, HTTPException):
            error = _from_http_exception(request, exc, settings)
        else:
            logger.exception("unhandled error on %s %s", request.method, request.url.path)
            error = APIError(f"internal server error: {type(exc).__name__}")
        return error_response(error)

    return handle_exception

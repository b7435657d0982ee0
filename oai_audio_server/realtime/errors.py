"""Errors of a realtime session: what becomes an ``error`` event, and what also ends it."""

from __future__ import annotations

from oai_audio_server.errors import APIError, InvalidRequestError
from oai_audio_server.realtime import protocol as wire


class SessionLimitError(APIError):
    """A session limit was passed: the client gets this error and the socket closes."""

    status_code = 400
    error_type = "invalid_request_error"


def error_detail(error: APIError, client_event_id: str | None = None) -> wire.ErrorDetail:
    return wire.ErrorDetail(
        type=error.error_type,
        code=error.code,
        message=error.message,
        param=error.param,
        event_id=client_event_id,
    )


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return InvalidRequestError(message, param=param, code=code)

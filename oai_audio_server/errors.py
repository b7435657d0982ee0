"""One error hierarchy for the whole server.

Every failure a caller can see is one of these classes. Each carries its HTTP status,
its OpenAI error ``type`` and ``code``, and the ``param`` that names what to fix, so the
HTTP layer maps errors by class (never by message text) to the OpenAI error body
``{"error": {"message", "type", "param", "code"}}``, for JSON replies and streams alike.
"""

from __future__ import annotations

from typing import Any, ClassVar


class APIError(Exception):
    """Base class: a server fault unless a subclass says otherwise."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status if status is not None else self.status_code
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers: dict[str, str] = dict(headers or {})

    def with_param(self, param: str) -> APIError:
        """Point the error at a request field when the raiser did not know where it was."""
        if self.param is None:
            self.param = param
        return self

    def to_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(APIError, ValueError):
    status_code = 400
    error_type = "invalid_request_error"


class InvalidAudioError(InvalidRequestError):
    """Bytes that cannot be decoded as audio, or audio outside the configured limits."""

    default_code = "invalid_audio"


class ContextLengthExceededError(InvalidRequestError):
    default_code = "context_length_exceeded"


class UnsupportedMediaTypeError(InvalidRequestError):
    """A body in a media type the route does not read (e.g. text/plain to a JSON route)."""

    status_code = 415
    default_code = "unsupported_media_type"


class AuthenticationError(APIError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(APIError):
    status_code = 403
    error_type = "permission_error"
    default_code = "forbidden"


class NotFoundError(APIError, LookupError):
    status_code = 404
    error_type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"


class PayloadTooLargeError(InvalidRequestError):
    status_code = 413
    default_code = "payload_too_large"


class OverloadedError(APIError):
    """The queue is full; the client should retry after ``Retry-After`` seconds."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "server_overloaded"

    def __init__(self, message: str, *, retry_after_seconds: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_seconds)})


class RequestTimeoutError(APIError):
    status_code = 408
    error_type = "timeout_error"
    default_code = "request_timeout"

    def __init__(self, message: str, *, worth_retrying: bool = True) -> None:
        # The OpenAI SDKs retry a 408 unless the server says otherwise. A request that
        # timed out in the queue may get in on a retry; one that ran out of time while
        # generating would only run out of time again, so tell the SDK not to retry.
        headers = {} if worth_retrying else {"x-should-retry": "false"}
        super().__init__(message, headers=headers)


class NotReadyError(APIError):
    """The model is still loading (or the server is shutting down)."""

    status_code = 503
    error_type = "service_unavailable"
    default_code = "model_not_ready"

    def __init__(self, message: str, *, retry_after_seconds: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_seconds)})


class ShuttingDownError(NotReadyError):
    """The server is draining after SIGTERM (or is about to exit after an engine crash);
    another replica, or this one after its restart, can take the request."""

    default_code = "server_shutting_down"


class ModelLoadFailedError(APIError):
    """The model could not be loaded: waiting will not help, so no Retry-After."""

    status_code = 503
    error_type = "service_unavailable"
    default_code = "model_load_failed"


class EngineError(APIError):
    """The model failed while generating: a server fault, never the caller's."""

    status_code = 500
    error_type = "server_error"
    default_code = "engine_error"

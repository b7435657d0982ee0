"""A hook the chat service calls while it answers one request.

The HTTP layer passes an observer to record time-to-first-token, token counts and audio
seconds for its request log and metrics; the service itself knows nothing about either.
"""

from __future__ import annotations

from typing import Protocol

from oai_audio_server.errors import APIError
from oai_audio_server.protocol import Usage


class GenerationObserver(Protocol):
    def first_token(self) -> None:
        """The first text of the answer is ready (called at most once)."""

    def finished(self, usage: Usage, audio_seconds: float) -> None:
        """The answer is complete; ``audio_seconds`` is all audio in the prompt."""

    def failed(self, error: APIError) -> None:
        """The reply (a stream, whose status was already sent) ended with this error."""

"""Whether a 408 tells the OpenAI SDK to retry: by where the request spent its time."""

from __future__ import annotations

from types import SimpleNamespace

from oai_audio_server.engine.core import _timeout_error


def handle(queued_at: float, admitted_at: float | None) -> object:
    return SimpleNamespace(queued_at=queued_at, admitted_at=admitted_at)


def test_a_request_that_never_left_the_queue_may_be_retried() -> None:
    error = _timeout_error(handle(0.0, None), now=3.01, deadline=3.0)  # type: ignore[arg-type]
    assert error.status == 408 and "x-should-retry" not in error.headers
    assert "busy" in error.message


def test_let_in_just_before_its_deadline_it_may_be_retried() -> None:
    # Under load it waited 2.9 of its 3 s and then had no time to generate.
    error = _timeout_error(handle(0.0, 2.9), now=3.01, deadline=3.0)  # type: ignore[arg-type]
    assert "x-should-retry" not in error.headers


def test_a_request_that_generated_most_of_its_time_is_not_retried() -> None:
    error = _timeout_error(handle(0.0, 0.2), now=3.01, deadline=3.0)  # type: ignore[arg-type]
    assert error.headers["x-should-retry"] == "false"
    assert "generated for 2.8 s" in error.message

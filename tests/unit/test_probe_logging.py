"""Health, liveness and metrics probes are logged at DEBUG; other requests at INFO."""

from __future__ import annotations

import logging

import pytest

from oai_audio_server.http.request_log import RequestRecord, log_request


@pytest.mark.parametrize(("path", "level"), [
    ("/health", logging.DEBUG), ("/live", logging.DEBUG), ("/metrics", logging.DEBUG),
    ("/v1/models", logging.INFO), ("/v1/chat/completions", logging.INFO),
])
def test_probe_requests_are_debug(path: str, level: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="oai_audio_server.requests")
    log_request(RequestRecord(request_id="r1", method="GET", path=path, started=0.0, status=200))
    assert [record.levelno for record in caplog.records] == [level]

"""Pieces of the production surface that need no server: bearer parsing, the in-memory
multipart parser, the local-file rule of /test-audio/, and the request record."""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path

import httpx
import pytest

from oai_audio_server.errors import InvalidRequestError, NotFoundError, PermissionDeniedError
from oai_audio_server.http import buffers, multipart_form, tutorial_routes
from oai_audio_server.http.auth import bearer_token, is_public
from oai_audio_server.http.multipart_form import parse_multipart
from oai_audio_server.http.request_log import RequestRecord
from oai_audio_server.http.tutorial_routes import allowed_local_file
from oai_audio_server.logging_setup import JsonLineFormatter
from oai_audio_server.protocol import Usage
from oai_audio_server.settings import Settings


def test_bearer_token() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    for header in (None, "", "abc", "Basic abc", "Bearer", "Bearer "):
        assert bearer_token(header) is None


def test_public_routes() -> None:
    assert is_public({"method": "GET", "path_template": "/health"})
    assert is_public({"method": "GET", "path_template": "/docs/openapi.json"})
    assert is_public({"method": "OPTIONS", "path_template": "/v1/chat/completions"})
    assert not is_public({"method": "GET", "path_template": "/metrics"})
    assert not is_public({"method": "GET", "path_template": "/docsx"})


def test_multipart_keeps_binary_and_names_in_memory() -> None:
    payload = bytes(range(256)) * 64 + b"\r\n--not-the-boundary\r\n"
    request = httpx.Request("POST", "http://x/", data={"text": "héllo"},
                            files={"file": ("../../etc/x.wav", payload, "audio/wav")})
    parts = parse_multipart(request.read(), request.headers["content-type"])
    assert parts["file"].data == payload
    assert parts["file"].filename == "../../etc/x.wav"
    assert parts["text"].text() == "héllo"


def test_multipart_in_chunks_and_steps_gives_the_same_parts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A body is parsed in the chunks it arrived in, large ones in steps; a large upload
    comes back as a view of fresh memory, byte for byte."""
    monkeypatch.setattr(multipart_form, "STEP", 1000)
    monkeypatch.setattr(buffers, "INLINE_BYTES", 5000)
    payload = os.urandom(20_000) + b"\r\n--x\r\n"
    request = httpx.Request("POST", "http://x/", data={"model": "m", "language": "de"},
                            files={"file": ("a.wav", payload, "audio/wav")})
    body, content_type = request.read(), request.headers["content-type"]
    for size in (1, 7, 999, 1000, 4096, len(body)):
        chunks = [body[at : at + size] for at in range(0, len(body), size)]
        parts = multipart_form.parse_multipart_parts(chunks, content_type)
        assert [(p.name, p.filename) for p in parts] == [
            ("model", None), ("language", None), ("file", "a.wav")]
        assert isinstance(parts[2].data, memoryview) and bytes(parts[2].data) == payload
        assert parts[1].text() == "de"


def test_upload_base64_in_steps_equals_one_encode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tutorial_routes, "_ENCODE_STEP", 6)
    for size in (0, 1, 2, 5, 6, 7, 100):
        data = os.urandom(size)
        assert bytes(tutorial_routes.base64_in_steps(data)) == base64.b64encode(data)
        assert bytes(tutorial_routes.base64_in_steps(memoryview(data))) == base64.b64encode(data)


def test_multipart_rejects_other_bodies() -> None:
    with pytest.raises(InvalidRequestError, match="reads a multipart/form-data") as wrong:
        parse_multipart(b"{}", "application/json")
    assert wrong.value.status == 415
    # A hand-set Content-Type without the boundary: say that, not what fields to send.
    with pytest.raises(InvalidRequestError, match="has no boundary") as caught:
        parse_multipart(b"garbage", "multipart/form-data")
    assert "'text'" not in caught.value.message
    with pytest.raises(InvalidRequestError):
        parse_multipart(b"garbage", "multipart/form-data; boundary=abc")


def test_allowed_local_file(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "a.wav").write_bytes(b"x")
    (tmp_path / "secret.wav").write_bytes(b"x")
    os.symlink(tmp_path / "secret.wav", allowed / "out.wav")
    os.symlink(allowed / "a.wav", allowed / "in.wav")
    settings = Settings(allowed_local_media_path=str(allowed))
    assert allowed_local_file(settings, "a.wav") == (allowed / "a.wav").resolve()
    assert allowed_local_file(settings, "in.wav") == (allowed / "a.wav").resolve()
    for outside in ("../secret.wav", str(tmp_path / "secret.wav"), "out.wav", "/etc/passwd",
                    "", "a\x00.wav"):
        with pytest.raises(PermissionDeniedError):
            allowed_local_file(settings, outside)
    with pytest.raises(NotFoundError):
        allowed_local_file(settings, "missing.wav")
    with pytest.raises(PermissionDeniedError):
        allowed_local_file(Settings(), str(allowed / "a.wav"))


def test_record_observes_first_token_once_and_usage() -> None:
    record = RequestRecord(request_id="r1", method="POST", path="/p", started=0.0)
    record.first_token()
    first = record.first_token_seconds
    record.first_token()
    assert record.first_token_seconds == first
    record.finished(Usage(prompt_tokens=7, completion_tokens=3, total_tokens=10), 1.5)
    fields = record.fields()
    assert fields["prompt_tokens"] == 7 and fields["completion_tokens"] == 3
    assert fields["audio_seconds"] == 1.5


def test_json_formatter_puts_request_fields_at_top_level() -> None:
    log = logging.LogRecord("oai_audio_server.requests", logging.INFO, __file__, 1,
                            "line", None, None)
    log.request = {"request_id": "r1", "status": 200}
    body = json.loads(JsonLineFormatter().format(log))
    assert body["request_id"] == "r1" and body["status"] == 200 and body["message"] == "line"

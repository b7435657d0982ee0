"""Production surface over real HTTP: API key, CORS, metrics, request log, OpenAPI and
the tutorial routes, on one server started with those settings."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from media import audio_part, tone, wav_bytes
from prometheus_client.parser import text_string_to_metric_families
from server_process import ServerProcess, running_server

KEY = "sk-test-key"
ORIGIN = "https://chat.example"
MODEL = "qwen-audio-chat"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "clip.wav").write_bytes(wav_bytes(tone(1.0, 330.0)))
    (root / "secret.wav").write_bytes(wav_bytes(tone(1.0, 550.0)))
    os.symlink(root / "secret.wav", allowed / "link-out.wav")
    return root


@pytest.fixture(scope="module")
def secured(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, media_dir: Path
) -> Iterator[ServerProcess]:
    with running_server(
        tiny_checkpoint,
        tmp_path_factory.mktemp("logs"),
        "--served-model-name", MODEL,
        "--api-key", KEY,
        "--allowed-origins", ORIGIN,
        "--allowed-local-media-path", str(media_dir / "allowed"),
        "--log-json",
    ) as process:
        yield process


def sdk(server: ServerProcess, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key=key, max_retries=0)


def assert_error(reply: httpx.Response, status: int, error_type: str | None = None) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if error_type is not None:
        assert error["type"] == error_type
    return error


# ---------------------------------------------------------------- authentication


def test_missing_or_wrong_key_is_401(secured: ServerProcess) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}):
        reply = httpx.get(secured.api_url + "/models", headers=headers)
        error = assert_error(reply, 401, "authentication_error")
        assert error["code"] == "invalid_api_key"
    assert httpx.get(secured.api_url + "/models", headers=AUTH).status_code == 200


def test_every_api_route_needs_the_key(secured: ServerProcess) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert_error(httpx.post(secured.api_url + "/chat/completions", json=chat), 401)
    streamed = chat | {"stream": True}
    assert_error(httpx.post(secured.api_url + "/chat/completions", json=streamed), 401)
    assert_error(httpx.get(secured.base_url + "/metrics"), 401)
    assert_error(httpx.post(secured.base_url + "/audio/", files={"file": b"x"}), 401)
    assert_error(httpx.get(secured.base_url + "/test-audio/", params={"audio": "clip.wav"}), 401)
    assert httpx.get(secured.base_url + "/metrics", headers=AUTH).status_code == 200


def test_probes_and_docs_are_open(secured: ServerProcess) -> None:
    for path in ("/health", "/live", "/openapi.json", "/docs"):
        assert httpx.get(secured.base_url + path).status_code == 200, path


def test_sdk_with_the_key_json_and_stream(secured: ServerProcess) -> None:
    client = sdk(secured)
    messages = [{"role": "user", "content": "hi"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=3, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_sdk_with_a_wrong_key_raises_authentication_error(secured: ServerProcess) -> None:
    client = sdk(secured, key="nope")
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, stream=True)


# ---------------------------------------------------------------- CORS


def test_preflight_passes_without_the_key(secured: ServerProcess) -> None:
    reply = httpx.options(secured.api_url + "/chat/completions", headers={
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    })
    assert reply.status_code in (200, 204), reply.text
    assert reply.headers["access-control-allow-origin"] == ORIGIN
    allowed = reply.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    assert "POST" in reply.headers["access-control-allow-methods"]


def test_preflight_from_another_origin_is_refused(secured: ServerProcess) -> None:
    reply = httpx.options(secured.api_url + "/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert reply.status_code == 403
    assert "access-control-allow-origin" not in reply.headers
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "cors_origin_not_allowed" and "--allowed-origins" in error["message"]


def test_cors_headers_on_replies_and_on_401(secured: ServerProcess) -> None:
    ok = httpx.get(secured.api_url + "/models", headers=AUTH | {"Origin": ORIGIN})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    # A browser can read why it was refused.
    refused = httpx.get(secured.api_url + "/models", headers={"Origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN


# ---------------------------------------------------------------- metrics


def scrape(server: ServerProcess) -> dict[str, list]:
    reply = httpx.get(server.base_url + "/metrics", headers=AUTH)
    # Prometheus' text format, with each parameter once (a duplicated charset was sent).
    params = [p.strip().split("=")[0] for p in reply.headers["content-type"].split(";")]
    assert params[0] == "text/plain" and "version" in params and params.count("charset") == 1
    text = reply.text
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, [])
               if all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_after_requests(secured: ServerProcess) -> None:
    before = scrape(secured)
    client = sdk(secured)
    clip = audio_part(wav_bytes(tone(2.0, 440.0)))
    messages = [{"role": "user", "content": [clip, {"type": "text", "text": "what?"}]}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, stream=True))
    assert reply.usage is not None
    after = scrape(secured)  # recorded before each reply ended: no wait needed

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = {"method": "POST", "route": "/v1/chat/completions"}
    assert grew("oas_http_requests_total", status="200", **route) == 2
    assert grew("oas_http_request_duration_seconds_count", **route) == 2
    assert grew("oas_time_to_first_token_seconds_count", stream="true") == 1
    assert grew("oas_time_to_first_token_seconds_count", stream="false") == 1
    assert grew("oas_prompt_tokens_total") == 2 * reply.usage.prompt_tokens
    assert grew("oas_completion_tokens_total") == 2 * reply.usage.completion_tokens
    assert grew("oas_audio_seconds_total") == pytest.approx(4.0)
    # The same clip twice: one decode, then a cache hit.
    assert grew("oas_audio_decodes_total") == 1 and grew("oas_audio_cache_hits_total") >= 1
    for gauge in ("oas_queue_depth", "oas_batch_size", "oas_model_ready"):
        assert gauge in after
    assert value(after, "oas_model_ready") == 1
    assert value(after, "oas_http_requests_total", route="/v1/models", status="401") >= 1


def test_transcriptions_count_tokens_and_audio_seconds(secured: ServerProcess) -> None:
    before = scrape(secured)
    client = sdk(secured)
    audio = ("clip.wav", wav_bytes(tone(3.0, 300.0)), "audio/wav")
    text = client.audio.transcriptions.create(model=MODEL, file=audio).text
    assert text, "the tiny model answers this clip with some text"
    list(client.audio.transcriptions.create(model=MODEL, file=audio, stream=True))
    after = scrape(secured)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("oas_audio_seconds_total") == pytest.approx(6.0)
    assert grew("oas_prompt_tokens_total") > 2 * 75  # 3 s of audio is 75 audio tokens
    assert grew("oas_completion_tokens_total") >= 2
    # Each upload is one 3 s segment: one first token each, labelled by how it was sent.
    assert grew("oas_time_to_first_token_seconds_count", stream="false") == 1
    assert grew("oas_time_to_first_token_seconds_count", stream="true") == 1


# ---------------------------------------------------------------- request log


def log_lines(server: ServerProcess, path: str, wait: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + wait
    while True:
        lines = []
        for line in server.log().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("path") == path:
                lines.append(entry)
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def test_json_request_log_line(secured: ServerProcess) -> None:
    clip = audio_part(wav_bytes(tone(1.0, 660.0)))
    body = {"model": MODEL, "max_tokens": 3,
            "messages": [{"role": "user", "content": [clip, {"type": "text", "text": "x"}]}]}
    reply = httpx.post(secured.api_url + "/chat/completions", json=body, headers=AUTH, timeout=60)
    assert reply.status_code == 200
    request_id = reply.headers["x-request-id"]
    deadline = time.monotonic() + 5
    while not (entries := [e for e in log_lines(secured, "/v1/chat/completions")
                           if e.get("request_id") == request_id]):
        assert time.monotonic() < deadline, secured.log()[-2000:]
        time.sleep(0.1)
    entry = entries[0]
    assert entry["method"] == "POST" and entry["status"] == 200
    assert entry["prompt_tokens"] == reply.json()["usage"]["prompt_tokens"]
    assert entry["completion_tokens"] == reply.json()["usage"]["completion_tokens"]
    assert entry["audio_seconds"] == pytest.approx(1.0)
    assert entry["latency_ms"] > 0 and entry["level"] == "INFO"
    # Every line of the server log is JSON with --log-json, uvicorn's included.
    assert all(json.loads(line) for line in secured.log().splitlines() if line.strip())


def test_refused_requests_are_logged_too(secured: ServerProcess) -> None:
    httpx.get(secured.base_url + "/no-such-route")
    entries = log_lines(secured, "/no-such-route")
    assert entries and entries[-1]["status"] == 404


def test_text_request_log_line(server: ServerProcess) -> None:
    """The shared server logs plain text: id, method, path, status, fields."""
    reply = httpx.get(server.api_url + "/models")
    request_id = reply.headers["x-request-id"]
    deadline = time.monotonic() + 5
    while request_id not in server.log():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    line = next(line for line in server.log().splitlines() if request_id in line)
    assert f"{request_id} GET /v1/models 200 latency_ms=" in line


# ---------------------------------------------------------------- OpenAPI


def test_openapi_lists_every_endpoint(secured: ServerProcess) -> None:
    schema = httpx.get(secured.base_url + "/openapi.json").json()
    assert schema["info"]["title"] == "oai-audio-server" and schema["info"]["version"]
    paths = schema["paths"]
    for path in ("/v1/chat/completions", "/v1/models", "/health", "/live", "/metrics",
                 "/audio", "/test-audio"):
        assert path in paths, sorted(paths)
    assert paths["/v1/chat/completions"]["post"]["summary"]
    assert "bearer" in schema["components"]["securitySchemes"]
    docs = httpx.get(secured.base_url + "/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    assert "https://" not in docs.text  # served by the package: works offline


# ---------------------------------------------------------------- tutorial routes


def assert_tutorial_reply(reply: httpx.Response) -> None:
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert set(body) == {"response", "status", "time"}
    assert body["status"] == "success" and isinstance(body["response"], str)
    assert isinstance(body["time"], float) and body["time"] >= 0


def test_upload_route(secured: ServerProcess) -> None:
    clip = wav_bytes(tone(1.0))
    url = secured.base_url + "/audio/"
    # The filename is only ever a string: a path in it reads or writes nothing.
    files = {"file": ("../../../../etc/passwd", clip, "audio/wav")}
    assert_tutorial_reply(httpx.post(url, files=files, headers=AUTH, timeout=60))
    reply = httpx.post(url, files={"file": ("a.wav", clip, "audio/wav")},
                       data={"text": "Describe the sound."}, headers=AUTH, timeout=60)
    assert_tutorial_reply(reply)


def test_upload_route_errors(secured: ServerProcess) -> None:
    url = secured.base_url + "/audio/"
    no_file = httpx.post(url, data={"text": "x"}, files={"other": b"1"}, headers=AUTH)
    error = assert_error(no_file, 400)
    assert error["param"] == "file"
    not_audio = httpx.post(url, files={"file": ("a.wav", b"not audio" * 50)}, headers=AUTH)
    error = assert_error(not_audio, 400)
    assert error["param"] == "file"
    assert_error(httpx.post(url, json={"file": "x"}, headers=AUTH), 415)


def test_local_file_inside_the_allowed_dir(secured: ServerProcess, media_dir: Path) -> None:
    url = secured.base_url + "/test-audio/"
    for audio in ("clip.wav", str(media_dir / "allowed" / "clip.wav")):
        reply = httpx.get(url, params={"audio": audio, "text": "what?"}, headers=AUTH, timeout=60)
        assert_tutorial_reply(reply)


def test_local_file_outside_the_allowed_dir_is_403(secured: ServerProcess, media_dir: Path) -> None:
    url = secured.base_url + "/test-audio/"
    for audio in ("../secret.wav", str(media_dir / "secret.wav"), "link-out.wav",
                  "/etc/passwd", str(media_dir / "allowed" / ".." / "secret.wav")):
        error = assert_error(httpx.get(url, params={"audio": audio}, headers=AUTH), 403,
                             "permission_error")
        assert error["param"] == "audio"
    assert_error(httpx.get(url, params={"audio": "missing.wav"}, headers=AUTH), 404)


def test_local_files_are_off_by_default(server: ServerProcess) -> None:
    reply = httpx.get(server.base_url + "/test-audio/", params={"audio": "/etc/passwd"})
    assert_error(reply, 403, "permission_error")

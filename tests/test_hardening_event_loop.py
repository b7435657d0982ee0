"""Issue #15 over real HTTP: huge bodies are answered or refused without holding the
event loop (/health keeps answering within 200 ms), and a body that does not arrive is
a 408."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import msgspec
import numpy as np
import pytest
from media import wav_bytes
from server_process import ServerProcess, running_server, slowest_health_while

MODEL = "qwen-audio-chat"
HEALTH_BOUND_SECONDS = 0.2  # the bound the issue names
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def big_server(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Default body limit (48 MiB), a short body deadline."""
    with running_server(
        tiny_checkpoint, tmp_path_factory.mktemp("logs"),
        "--served-model-name", MODEL, "--request-body-timeout", "2",
    ) as server:
        yield server


def chat_body(content: object) -> bytes:
    return msgspec.json.encode({"model": MODEL, "messages": [{"role": "user", "content": content}]})


def post(server: ServerProcess, body: bytes) -> httpx.Response:
    return httpx.post(server.api_url + "/chat/completions", content=body, timeout=120,
                      headers={"Content-Type": "application/json"})


def post_while_polling(server: ServerProcess, body: bytes) -> tuple[httpx.Response, float]:
    """The reply to ``body``, and the slowest /health answer while it was handled."""
    replies: list[httpx.Response] = []
    slowest = slowest_health_while(server, lambda: replies.append(post(server, body)))
    return replies[0], slowest


def test_a_40_mb_cjk_text_is_refused_without_holding_the_loop(big_server: ServerProcess) -> None:
    body = chat_body("汉字" * (40 * MIB // 6))
    reply, slowest = post_while_polling(big_server, body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == "context_length_exceeded"
    assert slowest < HEALTH_BOUND_SECONDS, f"/health took {slowest * 1000:.0f} ms"


def test_four_escaped_cjk_texts_at_once(big_server: ServerProcess) -> None:
    # json.dumps-style \\uXXXX escapes: the slow path of any JSON decoder.
    text = "汉" * (40 * MIB // 6 // 4)
    body = chat_body("").replace(b'"content":""', b'"content":"' + b"\\u6c49" * len(text) + b'"')
    replies: list[httpx.Response] = []

    def four() -> None:
        with ThreadPoolExecutor(4) as pool:
            replies.extend(pool.map(lambda _: post(big_server, body), range(4)))

    slowest = slowest_health_while(big_server, four)
    assert [r.status_code for r in replies] == [400] * 4, replies[0].text
    assert all(r.json()["error"]["code"] == "context_length_exceeded" for r in replies)
    assert slowest < HEALTH_BOUND_SECONDS, f"/health took {slowest * 1000:.0f} ms"


def test_a_45_mb_percent_encoded_data_uri_is_decoded_off_the_loop(
    big_server: ServerProcess,
) -> None:
    uri = "data:audio/wav," + "%41" * (45 * MIB // 3)
    body = chat_body([{"type": "audio_url", "audio_url": {"url": uri}}])
    reply, slowest = post_while_polling(big_server, body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == "invalid_audio"
    assert slowest < HEALTH_BOUND_SECONDS, f"/health took {slowest * 1000:.0f} ms"


def noise_wav_base64(seconds: float, rate: int = 16000, channels: int = 1) -> str:
    samples = np.random.default_rng(0).uniform(-0.3, 0.3, int(seconds * rate) * channels)
    return base64.b64encode(wav_bytes(samples.astype(np.float32), rate, channels)).decode()


def test_a_legal_44_mib_audio_body_is_answered_without_holding_the_loop(
    big_server: ServerProcess,
) -> None:
    parts: list[object] = [{"type": "text", "text": "What do you hear?"}]
    for seconds in (142.0, 53.0):  # 44.1 kHz stereo WAVs of 24 and 9 MiB
        parts.append({"type": "input_audio", "input_audio": {
            "data": noise_wav_base64(seconds, 44100, 2), "format": "wav"}})
    body = chat_body(parts).replace(b'"messages"', b'"max_tokens":1,"messages"')
    assert len(body) > 43 * MIB
    reply, slowest = post_while_polling(big_server, body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens"] > 195 * 25  # 25 audio tokens a second
    assert slowest < HEALTH_BOUND_SECONDS, f"/health took {slowest * 1000:.0f} ms"


def test_40_mb_of_ascii_text_is_refused_without_holding_the_loop(
    big_server: ServerProcess,
) -> None:
    body = chat_body([{"type": "text", "text": "word " * (40 * MIB // 5)}])
    reply, slowest = post_while_polling(big_server, body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == "context_length_exceeded"
    assert slowest < HEALTH_BOUND_SECONDS, f"/health took {slowest * 1000:.0f} ms"


def test_json_besides_audio_is_capped(big_server: ServerProcess) -> None:
    body = msgspec.json.encode({"model": MODEL, "metadata": {"n": [0] * (5 * MIB)},
                                "messages": [{"role": "user", "content": "hi"}]})
    reply = post(big_server, body)
    assert reply.status_code == 413, reply.text
    error = reply.json()["error"]
    assert error["code"] == "payload_too_large"
    assert "besides its long audio strings" in error["message"]


def test_json_objects_and_arrays_are_capped(big_server: ServerProcess) -> None:
    body = msgspec.json.encode({"model": MODEL, "metadata": {"n": [[]] * 150_000},
                                "messages": [{"role": "user", "content": "hi"}]})
    reply = post(big_server, body)
    assert reply.status_code == 413, reply.text
    assert "JSON objects and arrays" in reply.json()["error"]["message"]


def test_a_long_old_turn_is_dropped_not_refused(big_server: ServerProcess) -> None:
    """The window cannot hold the old turn, so the prompt builder drops it, as the
    official code would; the body reader must not refuse it first."""
    body = msgspec.json.encode({"model": MODEL, "max_tokens": 1, "messages": [
        {"role": "user", "content": "A" * 300_000}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "hi"}]})
    reply = post(big_server, body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens"] < 100


def test_messages_are_capped_at_max_messages(big_server: ServerProcess) -> None:
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    history = turn * 1023 + [{"role": "user", "content": "hi"}]  # 2047 messages: allowed
    for messages, status in ((history, 200), (history + turn, 400)):
        body = msgspec.json.encode({"model": MODEL, "max_tokens": 1, "messages": messages})
        reply = post(big_server, body)
        assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert (error["code"], error["param"]) == ("array_above_max_length", "messages")
    assert "2048" in error["message"] and "2049" in error["message"]


def test_every_spelling_of_a_large_audio_gets_the_same_answer(big_server: ServerProcess) -> None:
    """Bodies over 256 KiB take the path that cuts audio strings out of the JSON; a
    base64 string with line breaks (escapes) cannot be cut and takes the plain path."""
    encoded = noise_wav_base64(9.0)
    spellings = {
        "input_audio": chat_body([{"type": "input_audio",
                                   "input_audio": {"data": encoded, "format": "wav"}}]),
        "data: URI": chat_body([{"type": "audio_url", "audio_url": {
            "url": "data:audio/wav;base64," + encoded}}]),
        "MIME line breaks": chat_body([{"type": "input_audio", "input_audio": {
            "data": "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76)),
            "format": "wav"}}]),
    }
    spellings["escaped slashes (PHP)"] = spellings["input_audio"].replace(b"/", b"\\/")
    spellings["escaped '=' (Gson)"] = spellings["input_audio"].replace(b"=", b"\\u003d")
    spellings["escaped '+' (.NET)"] = spellings["input_audio"].replace(b"+", b"\\u002B")
    answers = {}
    for name, body in spellings.items():
        assert len(body) > 256 * 1024
        reply = post(big_server, body.replace(
            b'"messages"', b'"max_tokens":8,"temperature":0,"messages"'))
        assert reply.status_code == 200, (name, reply.text)
        answers[name] = (reply.json()["choices"][0]["message"]["content"],
                         reply.json()["usage"]["prompt_tokens"])
    assert len(set(answers.values())) == 1, answers


def test_a_body_that_does_not_arrive_is_408_and_closed(big_server: ServerProcess) -> None:
    address = urlsplit(big_server.base_url)
    assert address.hostname is not None and address.port is not None
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\":"
        )
        started = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        waited = time.monotonic() - started
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"request_body_timeout" in reply
        assert 1.0 < waited < 20
        sock.settimeout(10)
        assert sock.recv(1) == b"", "the connection stays open"

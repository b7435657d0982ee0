"""Issue #15 over real HTTP: huge bodies are refused without holding the event loop
(/health keeps answering within 200 ms), and a body that does not arrive is a 408."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import msgspec
import pytest
from server_process import ServerProcess, running_server

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


def slowest_health_while(server: ServerProcess, work: Callable[[], None]) -> float:
    """Run ``work`` while /health is polled; the slowest /health answer, in seconds."""
    done = threading.Event()
    latencies: list[float] = []

    def poll() -> None:
        with httpx.Client(timeout=30) as client:
            deadline = time.monotonic() + 300
            while not done.is_set() and time.monotonic() < deadline:
                started = time.perf_counter()
                assert client.get(server.base_url + "/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        work()
    finally:
        done.set()
        poller.join(60)
    assert len(latencies) >= 3, "too few /health probes to say anything"
    return max(latencies)


def post(server: ServerProcess, body: bytes) -> httpx.Response:
    return httpx.post(server.api_url + "/chat/completions", content=body, timeout=120,
                      headers={"Content-Type": "application/json"})


def test_a_40_mb_cjk_text_is_refused_without_holding_the_loop(big_server: ServerProcess) -> None:
    body = chat_body("汉字" * (40 * MIB // 6))
    replies: list[httpx.Response] = []
    slowest = slowest_health_while(big_server, lambda: replies.append(post(big_server, body)))
    assert replies[0].status_code == 400, replies[0].text
    assert replies[0].json()["error"]["code"] == "context_length_exceeded"
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
    replies: list[httpx.Response] = []
    slowest = slowest_health_while(big_server, lambda: replies.append(post(big_server, body)))
    assert replies[0].status_code == 400, replies[0].text
    assert replies[0].json()["error"]["code"] == "invalid_audio"
    assert slowest < HEALTH_BOUND_SECONDS, f"/health took {slowest * 1000:.0f} ms"


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

"""Concurrency over real HTTP: disconnects free their batch row, a full queue is a 429,
a request timeout is a 408, and a burst of requests leaks no threads or files."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
from media import audio_part, tone, wav_bytes
from server_process import ServerProcess, running_server

MODEL = "qwen-audio-chat"
T = TypeVar("T")
# The tiny model's ops are too small for intra-op threads (see the README's
# "Batching and performance"); one thread keeps these tests fast and steady.
SERVER_ENV = {"OMP_NUM_THREADS": "1"}
# Greedy answers of the tiny checkpoint: "Hello" runs 603 tokens before <|im_end|>,
# "Say something" 335; long enough to still be generating while a test acts.
LONG_PROMPT = "Hello"
MEDIUM_PROMPT = "Say something"
# Seconds the tight server allows a request: shorter than a LONG_PROMPT answer takes,
# longer than a test needs to fill the batch and the queue and probe them.
TIGHT_TIMEOUT = 0.4


def body(content: Any, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, **extra}


def run(work: Awaitable[T], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(work, timeout)

    return asyncio.run(bounded())


def health(server: ServerProcess) -> dict[str, Any]:
    reply = httpx.get(server.base_url + "/health", timeout=5)
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    return result


def wait_for_health(
    server: ServerProcess, condition: Callable[[dict[str, Any]], bool], what: str,
    timeout: float = 10.0,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats = health(server)
        if condition(stats):
            return stats
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {stats}"
        time.sleep(0.01)


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line in /proc/<pid>/status")


def sse_text(lines: list[str]) -> tuple[str, str | None]:
    """Content and finish reason of a list of SSE lines."""
    text, reason = "", None
    for line in lines:
        if not line.startswith("data: {"):
            continue
        event = json.loads(line[6:])
        assert "error" not in event, event
        for choice in event["choices"]:
            text += choice["delta"].get("content") or ""
            reason = choice["finish_reason"] or reason
    return text, reason


@pytest.fixture(scope="module")
def server_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server_tmp")


@pytest.fixture(scope="module")
def batch_server(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, server_tmp: Path
) -> Iterator[ServerProcess]:
    env = {**SERVER_ENV, "TMPDIR": str(server_tmp)}
    with running_server(
        tiny_checkpoint, tmp_path_factory.mktemp("logs"), "--served-model-name", MODEL,
        "--max-batch-size", "8", env=env,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def tight_server(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with running_server(
        tiny_checkpoint, tmp_path_factory.mktemp("logs"), "--served-model-name", MODEL,
        "--max-queue", "1", "--max-batch-size", "1", "--request-timeout", str(TIGHT_TIMEOUT),
        env=SERVER_ENV,
    ) as server:
        yield server


def test_disconnect_mid_stream_frees_the_row(batch_server: ServerProcess) -> None:
    url = batch_server.api_url + "/chat/completions"
    keeper = body(MEDIUM_PROMPT, 300, stream=True)
    alone = httpx.post(url, json={**keeper, "stream": False}, timeout=60).json()
    before = health(batch_server)

    async def scenario() -> tuple[str, str | None, int]:
        async with httpx.AsyncClient(timeout=60) as client:

            async def keep_reading() -> list[str]:
                async with client.stream("POST", url, json=keeper) as reply:
                    assert reply.status_code == 200
                    return [line async for line in reply.aiter_lines()]

            async def hang_up() -> int:
                chunks = 0
                async with client.stream(
                    "POST", url, json=body(LONG_PROMPT, 1500, stream=True)
                ) as reply:
                    async for line in reply.aiter_lines():
                        if line.startswith("data: {"):
                            chunks += 1
                        if chunks == 4:
                            break  # leaving the block closes the connection
                return chunks

            lines, chunks = await asyncio.gather(keep_reading(), hang_up())
        text, reason = sse_text(lines)
        return text, reason, chunks

    text, reason, chunks = run(scenario())
    assert chunks == 4
    assert text == alone["choices"][0]["message"]["content"] and reason == "length"
    after = wait_for_health(
        batch_server, lambda s: s["cancelled"] >= before["cancelled"] + 1, "the cancel"
    )
    assert after["finished"] == before["finished"] + 1  # only the stream that was read
    # The abandoned row stopped early: far fewer than its 603 natural tokens were made.
    assert after["completion_tokens"] - before["completion_tokens"] < 300 + 400
    wait_for_health(batch_server, lambda s: s["batch_size"] == 0, "an empty batch")


def test_client_timeout_stops_a_non_streamed_generation(batch_server: ServerProcess) -> None:
    before = health(batch_server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(batch_server.api_url + "/chat/completions",
                   json=body(LONG_PROMPT, 1500), timeout=httpx.Timeout(5, read=0.1))
    after = wait_for_health(
        batch_server, lambda s: s["cancelled"] >= before["cancelled"] + 1, "the cancel"
    )
    assert after["finished"] == before["finished"]
    assert after["completion_tokens"] - before["completion_tokens"] < 603


def test_full_queue_is_429_with_retry_after(tight_server: ServerProcess) -> None:
    url = tight_server.api_url + "/chat/completions"

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return list(await asyncio.gather(
                *(client.post(url, json=body(LONG_PROMPT, 1000)) for _ in range(6))
            ))

    replies = run(burst())
    statuses = [r.status_code for r in replies]
    # One runs and at most one waits (both then run out of time: 408); the rest are
    # turned away at once.
    assert 4 <= statuses.count(429) <= 5 and statuses.count(408) == 6 - statuses.count(429)
    rejected = next(r for r in replies if r.status_code == 429)
    assert rejected.headers["Retry-After"].isdigit()
    error = rejected.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "server_overloaded"
    assert set(error) == {"message", "type", "param", "code"}


def test_openai_sdk_raises_rate_limit_error_when_the_queue_is_full(
    tight_server: ServerProcess,
) -> None:
    client = openai.AsyncOpenAI(base_url=tight_server.api_url, api_key="unused", max_retries=0)
    messages: Any = [{"role": "user", "content": LONG_PROMPT}]

    async def scenario() -> None:
        async def slow() -> object:
            return await client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=1000, temperature=0)

        async def wait_for(key: str) -> None:
            deadline = time.monotonic() + 10
            async with httpx.AsyncClient() as probe:
                while (await probe.get(tight_server.base_url + "/health")).json()[key] != 1:
                    assert time.monotonic() < deadline, f"no {key} of 1"
                    await asyncio.sleep(0.002)

        running = asyncio.create_task(slow())
        await wait_for("batch_size")
        waiting = asyncio.create_task(slow())
        await wait_for("queue_depth")
        try:
            with pytest.raises(openai.RateLimitError) as caught:
                await slow()
            assert caught.value.status_code == 429
            assert caught.value.response.headers["Retry-After"].isdigit()
        finally:
            ends = await asyncio.gather(running, waiting, return_exceptions=True)
            await client.close()
        # Both ran out of the server's time (408), neither was turned away.
        assert all(isinstance(e, openai.APIStatusError) and e.status_code == 408 for e in ends)

    run(scenario())


def test_request_timeout_is_408_or_an_error_event(tight_server: ServerProcess) -> None:
    url = tight_server.api_url + "/chat/completions"
    reply = httpx.post(url, json=body(LONG_PROMPT, 1500), timeout=30)
    assert reply.status_code == 408
    assert reply.json()["error"]["type"] == "timeout_error"
    assert reply.json()["error"]["code"] == "request_timeout"
    # It ran out of time generating: the OpenAI SDK must not run it again (it would
    # retry a bare 408 twice, tripling the wait for the same failure).
    assert reply.headers["x-should-retry"] == "false"
    assert "shorter input or answer" in reply.json()["error"]["message"]

    with httpx.stream("POST", url, json=body(LONG_PROMPT, 1500, stream=True),
                      timeout=30) as streamed:
        assert streamed.status_code == 200
        events = [json.loads(line[6:]) for line in streamed.iter_lines()
                  if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "request_timeout"
    # A short answer still fits in the time allowed.
    quick = httpx.post(url, json=body("hi", 3), timeout=30)
    assert quick.status_code == 200, quick.text


def test_a_burst_leaks_no_threads_files_or_batch_rows(
    batch_server: ServerProcess, server_tmp: Path
) -> None:
    url = batch_server.api_url + "/chat/completions"
    wav = wav_bytes(tone(1.0, 523.0))
    prompts = ["hi", "Describe it", "What can you hear?", "Hello", "Say something"]

    def request_body(i: int) -> dict[str, Any]:
        text = prompts[i % len(prompts)]
        content: Any = text if i % 3 else [{"type": "text", "text": text}, audio_part(wav)]
        return body(content, 16 + (i % 5) * 8, stream=bool(i % 2))

    async def burst(count: int, concurrency: int) -> list[int]:
        limit = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=60) as client:

            async def one(i: int) -> int:
                async with limit:
                    reply = await client.post(url, json=request_body(i))
                    if request_body(i)["stream"]:
                        text = reply.text
                        assert '"error"' not in text and text.endswith("data: [DONE]\n\n")
                    return reply.status_code

            return list(await asyncio.gather(*(one(i) for i in range(count))))

    pid = batch_server.process.pid
    assert run(burst(16, 8)) == [200] * 16  # warm-up: the audio decode pool fills up
    wait_for_health(batch_server, lambda s: s["batch_size"] == 0, "an idle engine")
    threads_before = thread_count(pid)
    files_before = sorted(os.listdir(server_tmp))

    assert run(burst(40, 8)) == [200] * 40

    final = wait_for_health(
        batch_server, lambda s: s["batch_size"] == 0 and s["queue_depth"] == 0, "an idle engine"
    )
    assert final["failed"] == 0 and final["peak_batch_size"] >= 2
    deadline = time.monotonic() + 5
    while thread_count(pid) > threads_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert thread_count(pid) <= threads_before
    assert sorted(os.listdir(server_tmp)) == files_before

"""SIGTERM: stop accepting, let the in-flight stream finish, exit 0."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from server_process import running_server

MODEL = "qwen-audio-chat"


def test_sigterm_drains_streams_and_exits_zero(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with running_server(
        tiny_checkpoint, tmp_path_factory.mktemp("logs"),
        "--served-model-name", MODEL, "--shutdown-timeout", "30",
    ) as server:
        port = urlsplit(server.base_url).port
        assert port is not None
        first_text = threading.Event()
        events: list[str] = []
        failure: list[BaseException] = []

        def consume() -> None:
            # A long answer (the greedy tiny model writes about 650 tokens for this
            # prompt), so it is still streaming when SIGTERM arrives.
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to ten"}],
                    "max_tokens": 2000, "temperature": 0, "stream": True}
            try:
                with httpx.stream("POST", server.api_url + "/chat/completions",
                                  json=body, timeout=60) as reply:
                    for line in reply.iter_lines():
                        if line:
                            events.append(line)
                        if line.startswith("data: {") and '"content":"' in line[:400]:
                            if json.loads(line[6:])["choices"][0]["delta"].get("content"):
                                first_text.set()
            except BaseException as exc:  # reported by the main thread
                failure.append(exc)
            finally:
                first_text.set()

        reader = threading.Thread(target=consume)
        reader.start()
        assert first_text.wait(30)
        server.process.send_signal(signal.SIGTERM)

        refused = False
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not refused:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                time.sleep(0.05)
            except ConnectionRefusedError:
                refused = True
        still_streaming = reader.is_alive()

        reader.join(60)
        assert not failure, failure
        assert refused, "new connections were still accepted after SIGTERM"
        assert still_streaming, "the stream ended before SIGTERM was tested; make it longer"
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][6:])
        assert last["choices"][0]["finish_reason"] in ("stop", "length")
        assert server.process.wait(40) == 0, server.log()[-3000:]

"""Issue #15 over real HTTP: the shutdown deadline ends streams with an error event and
[DONE] (never a cut connection) within the deadline plus 1 s; an engine killed with
SIGKILL makes the server fail its requests and exit 1 for its supervisor."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_process import ServerProcess, running_server

MODEL = "qwen-audio-chat"
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Count to ten"}],
        "max_tokens": 2000, "temperature": 0, "stream": True}


class StreamReader(threading.Thread):
    """Reads one SSE stream to its end, keeping its data lines."""

    def __init__(self, server: ServerProcess, body: dict) -> None:
        super().__init__(daemon=True)
        self._server = server
        self._body = body
        self.lines: list[str] = []
        self.failure: BaseException | None = None
        self.first_text = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream("POST", self._server.api_url + "/chat/completions",
                              json=self._body, timeout=120) as reply:
                assert reply.status_code == 200, reply.read()
                for line in reply.iter_lines():
                    if line.startswith("data: "):
                        self.lines.append(line)
                        if '"content":"' in line and '"content":""' not in line:
                            self.first_text.set()
        except BaseException as exc:  # reported by the test
            self.failure = exc
        finally:
            self.first_text.set()


def engine_pid(server_pid: int) -> int:
    """The engine: the server's child started by multiprocessing's spawn."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    for child in children:
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
            return int(child)
    raise AssertionError(f"no engine process among {children}")


def test_sigterm_ends_unfinished_streams_with_an_error_and_done_in_time(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    deadline = 2.0
    with running_server(
        tiny_checkpoint, tmp_path_factory.mktemp("logs"),
        "--served-model-name", MODEL, "--shutdown-timeout", str(deadline),
    ) as server:
        readers = [StreamReader(server, LONG) for _ in range(4)]
        for reader in readers:
            reader.start()
        for reader in readers:
            assert reader.first_text.wait(60)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(30)
        took = time.monotonic() - signalled
        for reader in readers:
            reader.join(30)
        log = server.log()

    assert code == 0, log[-3000:]
    assert took <= deadline + 1.0, f"exited {took:.2f} s after SIGTERM"
    cut = 0
    for reader in readers:
        assert reader.failure is None, reader.failure  # never a connection closed mid-reply
        assert reader.lines[-1] == "data: [DONE]"
        last = json.loads(reader.lines[-2][len("data: "):])
        if "error" in last:
            assert last["error"]["code"] == "server_shutting_down", last
            assert last["error"]["type"] == "service_unavailable"
            cut += 1
        else:
            assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert cut >= 1, "no stream was still running at the deadline; make them longer"
    assert log.count("/v1/chat/completions cut") == cut, log[-3000:]
    assert "Traceback" not in log and "Cancel " not in log, log[-3000:]


def test_a_killed_engine_fails_its_requests_and_the_server_exits_1(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with running_server(
        tiny_checkpoint, tmp_path_factory.mktemp("logs"), "--served-model-name", MODEL,
    ) as server:
        reader = StreamReader(server, LONG)
        reader.start()
        assert reader.first_text.wait(60)
        os.kill(engine_pid(server.process.pid), signal.SIGKILL)
        killed = time.monotonic()
        code = server.process.wait(30)
        took = time.monotonic() - killed
        reader.join(30)
        log = server.log()

    assert code == 1, log[-3000:]
    assert took < 10, f"exited {took:.1f} s after the engine died"
    assert reader.failure is None, reader.failure
    assert reader.lines[-1] == "data: [DONE]"
    error = json.loads(reader.lines[-2][len("data: "):])["error"]
    assert error["code"] == "engine_error" and "engine process stopped" in error["message"]
    assert "exits (status 1) so that its supervisor restarts it" in log

"""Run the real server as a subprocess on 127.0.0.1 and wait (boundedly) until ready."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

READY_TIMEOUT_SECONDS = 120.0
# The shared suite servers' flags (one per model family): the names clients send, and a
# body limit that keeps oversized-body tests quick.
SUITE_FLAGS = (
    "--served-model-name", "qwen-audio-chat,whisper-1,qwen/Qwen-Audio-Chat",
    "--max-body-bytes", str(8 * 1024 * 1024),
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_ready(server: ServerProcess, timeout: float = READY_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log()}")
        try:
            if httpx.get(server.base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"server not ready after {timeout} s:\n{server.log()}")


def stop(server: ServerProcess, timeout: float = 30.0) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)
    return server.process.returncode


@contextmanager
def running_server(
    model_dir: Path, log_dir: Path, *flags: str, env: dict[str, str] | None = None,
    wait: bool = True,
) -> Iterator[ServerProcess]:
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    command = [
        sys.executable, "-m", "oai_audio_server", "serve", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), *flags,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        if wait:
            wait_ready(server)
        yield server
    finally:
        stop(server)


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

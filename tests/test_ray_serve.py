"""The server as a Ray Serve application, on a local Ray instance started here (CPU
replicas, tiny checkpoint): the README's commands (``ray start --head``, then
``oai-audio-server serve-ray ...``) end to end.

In file order: autoscaling from 1 to 2 replicas under load; the same command with
``--replicas 2``; chat (JSON, streamed), transcription, API key and load through the
proxy; per-replica metrics in Ray's Prometheus export; a replica's process killed
mid-run. Every wait is bounded; replicas start slowly on a busy 2-core machine, so the
bounds are generous.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install -e '.[ray]'")

from media import tone, wav_bytes  # noqa: E402
from ray_cluster import RayCluster, ray_cluster, running_replicas  # noqa: E402
from server_process import free_port  # noqa: E402

API_KEY = "ray-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "qwen-audio-chat"
REPLICA_HEADER = "x-oas-replica"
LONG_PROMPT = "Hello"  # a long greedy answer from the tiny model
READY_TIMEOUT_SECONDS = 420.0
DEPLOY_TIMEOUT_SECONDS = 180.0

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


@dataclass
class App:
    cluster: RayCluster
    model_dir: Path
    url: str
    port: int

    def serve_ray(self, *flags: str) -> None:
        """The README's command, against this cluster (RAY_ADDRESS), returning once
        the config is submitted."""
        command = [
            sys.executable, "-m", "oai_audio_server", "serve-ray", str(self.model_dir),
            "--port", str(self.port), "--num-gpus", "0", "--num-cpus", "1",
            "--max-batch-size", "2", "--served-model-name", f"{MODEL},whisper-1",
            "--api-key", API_KEY, *flags, "--non-blocking",
        ]
        done = subprocess.run(command, env=self.cluster.env(), capture_output=True,
                              timeout=DEPLOY_TIMEOUT_SECONDS)
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()

    def wait_replicas(self, count: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while running_replicas(self.cluster.address) != count:
            assert time.monotonic() < deadline, f"not {count} running replicas in time"
            time.sleep(1)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    with ray_cluster(num_cpus=4) as instance:
        yield instance
    import ray

    ray.shutdown()  # this process was a driver of the instance that is gone now


@pytest.fixture(scope="module")
def app(cluster: RayCluster, tiny_checkpoint: Path) -> App:
    port = free_port()
    return App(cluster, tiny_checkpoint, f"http://127.0.0.1:{port}", port)


@pytest.fixture(scope="module")
def two_replicas(app: App) -> App:
    """The fixed-size form of the same command (after the autoscaling test, or on its
    own when only later tests run)."""
    app.serve_ray("--replicas", "2")
    app.wait_replicas(2)
    return app


def chat_body(content: str, max_tokens: int, **extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, **extra}


def chat(app: App, max_tokens: int = 24) -> httpx.Response:
    return httpx.post(app.url + "/v1/chat/completions", json=chat_body("Hi", max_tokens),
                      headers=AUTH, timeout=120)


# ---------------------------------------------------------------------- autoscaling


def test_autoscaling_from_one_to_two_replicas_under_load(app: App) -> None:
    app.serve_ray("--min-replicas", "1", "--max-replicas", "2",
                  "--target-ongoing-requests", "1", "--upscale-delay-s", "1",
                  "--downscale-delay-s", "3600")
    app.wait_replicas(1)
    seen: set[str] = set()
    statuses: list[int] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                reply = http.post(app.url + "/v1/chat/completions", headers=AUTH,
                                  json=chat_body(LONG_PROMPT, 300))
                statuses.append(reply.status_code)
                seen.add(reply.headers.get(REPLICA_HEADER, "?"))

    clients = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    for thread in clients:
        thread.start()
    try:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while len(seen - {"?"}) < 2:
            assert time.monotonic() < deadline, f"load never reached a second replica: {seen}"
            time.sleep(1)
    finally:
        stop.set()
        for thread in clients:
            thread.join(150)
    assert running_replicas(app.cluster.address) == 2
    assert set(statuses) == {200}


# ---------------------------------------------------------------------- the API through Serve


def test_chat_json_through_the_proxy(two_replicas: App) -> None:
    reply = chat(two_replicas)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    assert body["usage"]["completion_tokens"] > 0
    assert reply.headers[REPLICA_HEADER]


def test_streaming_chunks_arrive_before_the_answer_ends(two_replicas: App) -> None:
    arrivals: list[tuple[float, str]] = []
    with httpx.stream("POST", two_replicas.url + "/v1/chat/completions", headers=AUTH,
                      json=chat_body(LONG_PROMPT, 400, stream=True), timeout=120) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic(), line[6:]))
    assert arrivals[-1][1] == "[DONE]"
    content = [at for at, data in arrivals if '"content":"' in data and '"content":""' not in data]
    assert len(content) >= 3
    # Passed through chunk by chunk: the first text came while the answer was still being
    # made, not in one burst with the end (a buffering proxy delivers all within ms).
    assert arrivals[-1][0] - content[0] > 0.05


def test_transcription_through_the_proxy(two_replicas: App) -> None:
    audio = wav_bytes(tone(2.0, 330.0) + 0.01 * np.ones(32000, dtype=np.float32))
    reply = httpx.post(
        two_replicas.url + "/v1/audio/transcriptions", headers=AUTH, timeout=120,
        data={"model": "whisper-1"}, files={"file": ("speech.wav", audio, "audio/wav")},
    )
    assert reply.status_code == 200, reply.text
    assert isinstance(reply.json()["text"], str)


def test_api_key_is_required_through_the_proxy(two_replicas: App) -> None:
    refused = httpx.post(two_replicas.url + "/v1/chat/completions", json=chat_body("Hi", 4),
                         timeout=60)
    assert refused.status_code == 401
    assert refused.json()["error"]["type"]
    assert httpx.get(two_replicas.url + "/health", timeout=60).status_code == 200


def test_load_from_eight_clients_reaches_both_replicas(two_replicas: App) -> None:
    replies: list[httpx.Response] = []

    def client() -> None:
        for _ in range(3):
            replies.append(chat(two_replicas, max_tokens=40))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert [r.status_code for r in replies] == [200] * 24
    assert len({r.headers[REPLICA_HEADER] for r in replies}) == 2


def test_metrics_of_each_replica_reach_rays_prometheus_export(two_replicas: App) -> None:
    url = f"http://127.0.0.1:{two_replicas.cluster.metrics_port}/metrics"
    pattern = re.compile(r'^ray_oas_http_requests_total\{[^}]*replica="([^"]+)"', re.M)
    deadline = time.monotonic() + 120
    replicas: set[str] = set()
    text = ""
    while len(replicas) < 2:
        assert time.monotonic() < deadline, f"per-replica metrics missing:\n{text[-3000:]}"
        time.sleep(2)
        text = httpx.get(url, timeout=30).text
        replicas = set(pattern.findall(text))
    assert "ray_serve_num_http_requests" in text  # Serve's own, in the same scrape
    assert re.search(r'^ray_oas_model_ready\{[^}]*deployment="OaiAudioServer"', text, re.M)


# ---------------------------------------------------------------------- failover


@dataclass
class StreamResult:
    replica: str = ""
    chunks: int = 0
    done: bool = False
    error: str = ""
    error_event: str = ""  # the server's own error, sent in the stream
    started: threading.Event = field(default_factory=threading.Event)


def stream_long(app: App, result: StreamResult) -> None:
    try:
        with httpx.stream("POST", app.url + "/v1/chat/completions", headers=AUTH,
                          json=chat_body(LONG_PROMPT, 1500, stream=True),
                          timeout=httpx.Timeout(120)) as reply:
            result.replica = reply.headers.get(REPLICA_HEADER, "")
            if reply.status_code != 200:
                result.error = f"status {reply.status_code}"
                return
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    result.chunks += 1
                    result.started.set()
                    result.done = line == "data: [DONE]"
                    if '"error"' in line:
                        result.error_event = line
    except httpx.HTTPError as exc:
        result.error = repr(exc)
    finally:
        result.started.set()


def streams_in_flight(app: App) -> tuple[list[StreamResult], list[threading.Thread]]:
    """Eight long streams, over both replicas, each past its first chunk."""
    results = [StreamResult() for _ in range(8)]
    threads = [threading.Thread(target=stream_long, args=(app, r)) for r in results]
    for thread in threads:
        thread.start()
    for result in results:
        assert result.started.wait(180), "a stream did not start"
    return results, threads


def join_all(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(300)
    assert all(not t.is_alive() for t in threads)


def test_a_killed_replica_fails_its_requests_only_and_is_replaced(two_replicas: App) -> None:
    app = two_replicas
    results, threads = streams_in_flight(app)
    replicas = app.cluster.replica_processes()
    assert len(replicas) == 2
    victim = replicas[0]
    os.kill(victim.pid, signal.SIGKILL)
    join_all(threads)

    failed = [r for r in results if not r.done]
    finished = [r for r in results if r.done]
    assert failed, "no request was on the killed replica"
    # A clean failure: an error the client sees (a cut-off stream, or an error status),
    # never a stream that looks complete.
    assert all(r.error for r in failed), [(r.replica, r.chunks) for r in failed]
    dead = {r.replica for r in failed}
    assert len(dead) == 1, dead
    assert all(r.replica not in dead for r in finished)
    assert finished, "the other replica's requests did not finish"

    app.wait_replicas(2)  # Serve started another replica
    assert victim.pid not in {p.pid for p in app.cluster.replica_processes()}
    tags = {chat(app).headers.get(REPLICA_HEADER) for _ in range(12)}
    assert tags and not tags & dead


def test_an_engine_crash_fails_its_requests_and_serve_replaces_the_replica(
    two_replicas: App,
) -> None:
    app = two_replicas
    results, threads = streams_in_flight(app)
    replica = app.cluster.replica_processes()[0]
    engines = [p for p in replica.children() if "spawn_main" in " ".join(p.cmdline())]
    assert len(engines) == 1, engines
    engines[0].kill()
    join_all(threads)

    failed = [r for r in results if r.error_event]
    assert failed, "no request was on the crashed engine"
    # The server's own error, as a final event of the stream, then [DONE].
    assert all("engine" in r.error_event and r.done for r in failed)
    dead = {r.replica for r in failed}
    assert len(dead) == 1, dead
    others = [r for r in results if r.replica not in dead]
    assert others and all(r.done and not r.error and not r.error_event for r in others)

    # The health check fails, Serve stops the replica and starts another.
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while replica.is_running() and replica.status() != "zombie":
        assert time.monotonic() < deadline, "Serve kept the replica with a dead engine"
        time.sleep(1)
    app.wait_replicas(2)
    tags = {chat(app).headers.get(REPLICA_HEADER) for _ in range(12)}
    assert tags and not tags & dead

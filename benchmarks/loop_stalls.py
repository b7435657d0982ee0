"""Event-loop stalls caused by large request bodies: for each kind of body near the
48 MiB limit, the longest time the server's event loop was held while it handled one
(from the server's ``oas_event_loop_lag_seconds`` histogram, as the bucket that holds
it) and the slowest ``/health`` answer seen by a client polling every 20 ms meanwhile.

    python benchmarks/loop_stalls.py [MODEL_DIR] [--cases NAME ...]

Target (issue #15): no case holds the loop for more than ~50 ms. Without MODEL_DIR the
tiny test checkpoint is built in a temporary directory.
"""

from __future__ import annotations

import argparse
import base64
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import numpy as np

TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS_DIR))

from media import wav_bytes  # noqa: E402
from server_process import ServerProcess, running_server, slowest_health_while  # noqa: E402

MODEL = "stalls"
MIB = 1024 * 1024
BUCKET = re.compile(r'^oas_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', re.M)


def noise_wav(seconds: float, rate: int, channels: int) -> bytes:
    """Noise compresses nothing away, so the file is as large as its duration says."""
    samples = np.random.default_rng(0).uniform(-0.3, 0.3, int(seconds * rate) * channels)
    return wav_bytes(samples.astype(np.float32), rate=rate, channels=channels)


def chat(content: object) -> bytes:
    return msgspec.json.encode({"model": MODEL, "max_tokens": 1,
                                "messages": [{"role": "user", "content": content}]})


def two_audio_parts(as_data_uri: bool, durations: tuple[float, ...] = (142.0, 53.0)
                    ) -> list[object]:
    """44.1 kHz stereo WAVs, by default 24 MiB and 9 MiB: a legal body of about 44 MiB."""
    parts: list[object] = [{"type": "text", "text": "What do you hear?"}]
    for seconds in durations:
        encoded = base64.b64encode(noise_wav(seconds, 44100, 2)).decode("ascii")
        if as_data_uri:
            parts.append({"type": "audio_url",
                          "audio_url": {"url": "data:audio/wav;base64," + encoded}})
        else:
            parts.append({"type": "input_audio",
                          "input_audio": {"data": encoded, "format": "wav"}})
    return parts


@dataclass(frozen=True)
class Upload:
    """A body for another route than chat completions."""

    path: str
    content: bytes
    content_type: str


def transcription_upload() -> Upload:
    request = httpx.Request("POST", "http://x/", data={"model": MODEL},
                            files={"file": ("a.wav", noise_wav(142.0, 44100, 2), "audio/wav")})
    return Upload("/audio/transcriptions", request.read(), request.headers["content-type"])


def bodies() -> dict[str, tuple[str, Callable[[], bytes | Upload]]]:
    """name -> (what it is, body maker): made lazily, each case holds one body."""
    return {
        "base64": ("2 WAVs as input_audio base64 (legal, 44 MiB)",
                   lambda: chat(two_audio_parts(as_data_uri=False))),
        "data-uri": ("2 WAVs as data: URIs (legal, 44 MiB)",
                     lambda: chat(two_audio_parts(as_data_uri=True))),
        "escaped-slashes": ("the same with every '/' written '\\/' (PHP's json_encode)",
                            lambda: chat(two_audio_parts(as_data_uri=False))
                            .replace(b"/", b"\\/")),
        "escaped-plus": ("the 24 MiB WAV with every '+' written '\\u002B' (.NET), 35 MiB",
                         lambda: chat(two_audio_parts(False, (142.0,)))
                         .replace(b"+", b"\\u002B")),
        "multipart": ("a 24 MiB WAV uploaded to /v1/audio/transcriptions (legal)",
                      transcription_upload),
        "ascii-text": ("40 MiB of ASCII text (refused: too long)",
                       lambda: chat("word " * (40 * MIB // 5))),
        "cjk-text": ("40 MiB of CJK text (refused: too long)",
                     lambda: chat("汉字" * (40 * MIB // 6))),
        "nested-arrays": ("1.3 million empty arrays in tool_choice, 3.9 MiB (refused)",
                          lambda: msgspec.json.encode({
                              "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "tool_choice": [[]] * 1_300_000})),
        "long-history": ("125,001 messages of history, 4 MiB (refused: too many objects)",
                         lambda: msgspec.json.encode({
                             "model": MODEL, "max_tokens": 1,
                             "messages": [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "ok"}] * 62_500
                             + [{"role": "user", "content": "hi"}]})),
        "percent-uri": ("45 MiB percent-encoded data: URI (refused: not audio)",
                        lambda: chat([{"type": "audio_url", "audio_url": {
                            "url": "data:audio/wav," + "%41" * (45 * MIB // 3)}}])),
    }


def lag_buckets(server: ServerProcess) -> dict[float, float]:
    """Cumulative counts of the server's event-loop lag histogram, by upper bound."""
    counts: dict[float, float] = {}
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    for match in BUCKET.finditer(text):
        counts[float(match.group(1))] = float(match.group(2))
    return counts


def longest_lag(before: dict[float, float], after: dict[float, float]) -> str:
    """The smallest bucket bound that holds every lag seen between two readings."""
    bounds = sorted(bound for bound in after if bound != float("inf"))
    for bound in bounds:
        if after[bound] - before.get(bound, 0.0) == after[float("inf")] - before[float("inf")]:
            return f"<= {bound * 1000:g}"
    return f"> {bounds[-1] * 1000:g}"


def run_case(server: ServerProcess, body: bytes | Upload) -> tuple[int, float, str, float]:
    """(status, request seconds, longest loop lag ms (bucket), slowest /health ms)."""
    before = lag_buckets(server)
    upload = body if isinstance(body, Upload) else Upload(
        "/chat/completions", body, "application/json")
    replies: list[tuple[httpx.Response, float]] = []

    def send() -> None:
        started = time.perf_counter()
        reply = httpx.post(server.api_url + upload.path, content=upload.content, timeout=600,
                           headers={"Content-Type": upload.content_type})
        replies.append((reply, time.perf_counter() - started))

    slowest = slowest_health_while(server, send)
    reply, took = replies[0]
    if reply.status_code >= 500:
        print(f"  server error: {reply.text[:300]}", file=sys.stderr)
    return reply.status_code, took, longest_lag(before, lag_buckets(server)), 1000 * slowest


def main() -> None:
    cases = bodies()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", type=Path)
    parser.add_argument("--cases", nargs="+", choices=sorted(cases), default=list(cases))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="oas-stalls-"))
    model_dir = args.model_dir
    if model_dir is None:
        from tiny_model import build_tiny_checkpoint

        model_dir = build_tiny_checkpoint(work / "tiny", seed=0)
    with running_server(model_dir, work, "--served-model-name", MODEL) as server:
        # One small request first: start-up work (first imports, the first decode) is
        # not what a body costs.
        warm_up = chat([{"type": "input_audio", "input_audio": {
            "data": base64.b64encode(noise_wav(1.0, 16000, 1)).decode("ascii"),
            "format": "wav"}}])
        httpx.post(server.api_url + "/chat/completions", content=warm_up, timeout=600,
                   headers={"Content-Type": "application/json"}).raise_for_status()
        print("| body | status | request s | longest loop lag ms | slowest /health ms |")
        print("|------|--------|-----------|---------------------|--------------------|")
        for name in args.cases:
            what, make = cases[name]
            status, took, held, slowest = run_case(server, make())
            print(f"| {what} | {status} | {took:.2f} | {held} | {slowest:.0f} |", flush=True)


if __name__ == "__main__":
    main()

"""Realtime transcription latency: concurrent /v1/realtime sessions, each streaming turns.

    python benchmarks/realtime_latency.py [MODEL_DIR] [--sessions 1,4,8] [--turns 3]
        [--turn-seconds 1.5] [--torch-threads N]

Every session streams each turn as 100 ms chunks of 24 kHz PCM at real time, then commits
it by hand, and times the commit to the first transcript delta and to the completed
transcript. Prints one row per session count. Without MODEL_DIR the tiny test checkpoint
is built in a temporary directory (its text is random; the times are what count).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS_DIR))

from media import tone  # noqa: E402
from server_process import ServerProcess, running_server  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

RATE = 24000
CHUNK_SECONDS = 0.1


def session(server: ServerProcess, turns: int, seconds: float, seed: int,
            first: list[float], done: list[float], errors: list[str]) -> None:
    url = server.base_url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"
    rng = np.random.default_rng(seed)
    try:
        with connect(url, max_size=None) as ws:
            ws.recv(timeout=60)  # session.created
            ws.send(json.dumps({"type": "session.update", "session": {
                "type": "transcription", "audio": {"input": {"turn_detection": None}}}}))
            for turn in range(turns):
                signal = tone(seconds, 200.0 + 40 * turn + 10 * seed, RATE)
                signal += 0.02 * rng.standard_normal(signal.shape[0]).astype(np.float32)
                pcm = (np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes()
                step = int(2 * RATE * CHUNK_SECONDS)
                for start in range(0, len(pcm), step):
                    chunk = base64.b64encode(pcm[start : start + step]).decode()
                    ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
                    time.sleep(CHUNK_SECONDS)  # a microphone's pace
                sent = time.perf_counter()
                ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
                got_first = False
                while True:
                    event = json.loads(ws.recv(timeout=300))
                    kind = event["type"].removeprefix("conversation.item.input_audio_")
                    if kind == "transcription.delta" and not got_first:
                        first.append(time.perf_counter() - sent)
                        got_first = True
                    elif kind == "transcription.completed":
                        done.append(time.perf_counter() - sent)
                        break
                    elif kind in ("error", "transcription.failed"):
                        errors.append(event["error"]["message"])
                        break
    except Exception as exc:  # counted, so a broken run shows in the table
        errors.append(f"{type(exc).__name__}: {exc}")


def percentile(values: list[float], q: float) -> str:
    """Nearest rank, in ms."""
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", nargs="?")
    parser.add_argument("--sessions", default="1,4,8")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--turn-seconds", type=float, default=1.5)
    parser.add_argument("--torch-threads", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(args.model_dir) if args.model_dir else None
        if model_dir is None:
            from tiny_model import build_tiny_checkpoint

            model_dir = build_tiny_checkpoint(Path(scratch) / "tiny", seed=0)
        flags = ["--served-model-name", "bench"]
        if args.torch_threads:
            flags += ["--cpu-threads", str(args.torch_threads)]
        with running_server(model_dir, Path(scratch), *flags) as server:
            print("| sessions | turns | errors | first delta p50 | p95 | completed p50 | p95 |")
            print("|---|---|---|---|---|---|---|")
            for count in (int(n) for n in args.sessions.split(",")):
                first: list[float] = []
                done: list[float] = []
                errors: list[str] = []
                threads = [
                    threading.Thread(target=session, args=(server, args.turns,
                                                           args.turn_seconds, i, first,
                                                           done, errors))
                    for i in range(count)
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(600)
                print(f"| {count} | {len(done)} | {len(errors)} | {percentile(first, 0.5)} | "
                      f"{percentile(first, 0.95)} | {percentile(done, 0.5)} | "
                      f"{percentile(done, 0.95)} |")
                for message in sorted(set(errors))[:3]:
                    print(f"  error: {message}")


if __name__ == "__main__":
    main()

"""Serving throughput and latency of the native engine, next to the decode floor.

    python benchmarks/serving_benchmark.py [MODEL_DIR] [--full-size] [--concurrency 1,8,32,64]
        [--seconds 30] [--max-tokens 128] [--audio-seconds 6] [--device auto]
        [--family qwen-audio|qwen2-audio]

Starts the server on MODEL_DIR (a subprocess on 127.0.0.1, free port) and runs
closed-loop clients at each concurrency for ``--seconds`` (every client sends its next
request as soon as its previous answer ends), streaming. Each request is an audio of
``--audio-seconds`` plus a question, greedy, ``--max-tokens`` new tokens; only questions
whose greedy answer runs to the limit are used, so every request decodes exactly that
many tokens. Printed per concurrency: tokens/s, TTFT, latency, the server's mean decode
step (from the engine's counters) and the floor of one decode step at that batch size
measured in this process on the same device (see decode_floor.py).

Without MODEL_DIR a checkpoint is built in a temporary directory: the tiny test shapes,
or with ``--full-size`` the published model's shapes with random weights, built on the
device in seconds (random_checkpoint.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS_DIR))
sys.path.insert(0, str(TESTS_DIR.parent))

from decode_floor import decoder_shape, floor_step_ms  # noqa: E402
from load import closed_loop_clients  # noqa: E402
from server_process import ServerProcess, running_server  # noqa: E402

MODEL = "bench"
CANDIDATE_PROMPTS = [
    "Hello", "Say something", "hi", "Describe it", "What is the weather like today?",
    "Tell me about the news of the day.", "Summarize what the speaker is talking about.",
    "Where are we?", "What time is it?", "Is there music in the background?",
    "Which language is spoken in this recording?", "Translate the speech into English.",
    "Please describe the sound.", "What is the emotion of the speaker?",
    "The quick brown fox jumps over the lazy dog.", "How are you today?",
    "What can you hear?", "Transcribe the audio.", "What does the speaker say?",
    "Count to ten.", "Tell me a story.", "Write a poem.", "Explain batching.",
    "Name three colours.",
]


@dataclass
class Sample:
    ttft: float
    latency: float
    tokens: int


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    wall: float
    samples: list[Sample]
    engine: dict[str, float]  # engine counters over this level (from /metrics)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)


ENGINE_COUNTERS = ("prefills", "decode_steps", "decode_time_us", "completion_tokens")


def engine_counters(server: ServerProcess) -> dict[str, float]:
    """The engine's own counters, read from the Prometheus text of /metrics."""
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        for name in ENGINE_COUNTERS:
            if line.startswith(f"oas_engine_{name}_total "):
                found[name] = float(line.split()[1])
    return found


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def make_audio(seconds: float) -> str:
    """Base64 WAV of a few tones and some noise, ``seconds`` long."""
    import base64

    from media import tone, wav_bytes

    return base64.b64encode(wav_bytes(tone(seconds, 220.0))).decode()


def chat_body(
    prompt: str, max_tokens: int, stream: bool, audio: str | None = None
) -> dict[str, Any]:
    content: Any = prompt
    if audio is not None:
        content = [{"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
                   {"type": "text", "text": prompt}]
    body: dict[str, Any] = {
        "model": MODEL, "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "temperature": 0, "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def pick_prompts(
    server: ServerProcess, max_tokens: int, wanted: int, audio: str | None = None
) -> list[str]:
    """Prompts whose greedy answer runs to max_tokens (no early stop)."""
    chosen: list[str] = []
    with httpx.Client(timeout=600) as client:
        for prompt in CANDIDATE_PROMPTS:
            reply = client.post(server.api_url + "/chat/completions",
                                json=chat_body(prompt, max_tokens, False, audio)).json()
            if reply["choices"][0]["finish_reason"] == "length":
                chosen.append(prompt)
            if len(chosen) == wanted:
                break
    if not chosen:
        raise SystemExit("no prompt runs to --max-tokens on this checkpoint; lower it")
    return chosen


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Sample:
    start = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    async with client.stream("POST", url, json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}")
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if ttft is None and any(c["delta"].get("content") for c in event["choices"]):
                ttft = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return Sample(ttft if ttft is not None else latency, latency, tokens)


async def closed_loop(
    server: ServerProcess,
    prompts: list[str],
    concurrency: int,
    requests: int,
    max_tokens: int,
    audio: str | None = None,
    seconds: float | None = None,
) -> LevelResult:
    url = server.api_url + "/chat/completions"
    samples: list[Sample] = []
    errors = 0

    async def send(client: httpx.AsyncClient, index: int) -> None:
        nonlocal errors
        body = chat_body(prompts[index % len(prompts)], max_tokens, stream=True, audio=audio)
        try:
            samples.append(await one_request(client, url, body))
        except Exception as exc:  # counted and reported, never hidden
            errors += 1
            print(f"  request {index} failed: {exc}", file=sys.stderr)

    before = engine_counters(server)
    if seconds is not None:
        wall = await closed_loop_clients(100_000, concurrency, send, seconds=seconds)
    else:
        wall = await closed_loop_clients(requests, concurrency, send)
    after = engine_counters(server)
    engine = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in ENGINE_COUNTERS}
    return LevelResult(concurrency, len(samples) + errors, errors, wall, samples, engine)


def rows_per_step(result: LevelResult) -> float:
    """Average rows in a decode step: a prefill makes each row's first token, every other
    token comes from a decode step."""
    steps = result.engine["decode_steps"]
    decoded = result.engine["completion_tokens"] - len(result.samples)
    return decoded / steps if steps else float("nan")


def decode_step_ms(result: LevelResult) -> float:
    steps = result.engine["decode_steps"]
    return result.engine["decode_time_us"] / steps / 1000 if steps else float("nan")


def print_levels(results: list[LevelResult], floors: dict[int, float]) -> None:
    header = (f"| {'clients':>7} | {'requests':>8} | {'errors':>6} | {'tokens/s':>9} | "
              f"{'TTFT p50':>9} | {'TTFT p95':>9} | {'lat p50':>8} | {'rows/step':>9} | "
              f"{'step':>8} | {'floor':>8} | {'step/floor':>10} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in results:
        ttfts = [x.ttft * 1000 for x in r.samples]
        lats = [x.latency * 1000 for x in r.samples]
        step = decode_step_ms(r)
        floor = floors.get(r.concurrency, float("nan"))
        print(f"| {r.concurrency:>7} | {len(r.samples):>8} | {r.errors:>6} | "
              f"{r.tokens / r.wall:>9.1f} | {percentile(ttfts, 50):>7.1f}ms | "
              f"{percentile(ttfts, 95):>7.1f}ms | {percentile(lats, 50):>6.0f}ms | "
              f"{rows_per_step(r):>9.2f} | {step:>6.2f}ms | {floor:>6.2f}ms | "
              f"{step / floor:>10.2f} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", type=Path)
    parser.add_argument("--full-size", action="store_true",
                        help="without MODEL_DIR: build the published shapes, random weights")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=30.0, help="load time per level")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--audio-seconds", type=float, default=6.0)
    parser.add_argument("--max-model-len", type=int, default=1024,
                        help="KV-cache slot length for the server (prompt + answer); "
                        "0 leaves the server's default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--family", choices=("qwen-audio", "qwen2-audio"), default="qwen-audio",
                        help="without MODEL_DIR: which model family to build")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="CPU intra-op threads for the server (--cpu-threads)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]

    import torch

    from oai_audio_server.engine.loader import cpu_thread_count, pick_device, pick_dtype

    device = pick_device(args.device)
    dtype = pick_dtype("auto", device)
    threads = cpu_thread_count(args.torch_threads)
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="oas-bench-"))
    model_dir = args.model_dir
    if model_dir is None:
        from random_checkpoint import build_family

        if args.full_size or args.family != "qwen-audio":
            model_dir = build_family(
                args.family, work / "full", full_size=args.full_size, device=device, dtype=dtype
            )
        else:
            from tiny_model import build_tiny_checkpoint

            model_dir = build_tiny_checkpoint(work / "tiny", seed=0)
    config = json.loads((model_dir / "config.json").read_text())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    kv_len = args.max_tokens + 64 + int(args.audio_seconds * 25)
    floors = {c: floor_step_ms(decoder_shape(config), c, kv_len, device, dtype) for c in levels}

    flags = ["--served-model-name", MODEL, "--device", args.device,
             "--cpu-threads", str(threads),
             "--max-batch-size", str(max(levels)), "--max-queue", str(4 * max(levels))]
    if args.max_model_len > 0:
        flags += ["--max-model-len", str(args.max_model_len)]
    audio = make_audio(args.audio_seconds)
    with running_server(model_dir, work, *flags) as server:
        prompts = pick_prompts(server, args.max_tokens, wanted=8, audio=audio)
        print(f"model {model_dir} ({decoder_shape(config)['num_hidden_layers']} layers of "
              f"{decoder_shape(config)['hidden_size']}), device {device_name} ({dtype}), "
              f"{args.audio_seconds:g} s audio + question, {args.max_tokens} greedy tokens, "
              f"{args.seconds:g} s per level, {len(prompts)} questions, cpus {os.cpu_count()}\n")
        asyncio.run(closed_loop(server, prompts, 2, 4, args.max_tokens, audio))  # warm-up
        results = [
            asyncio.run(closed_loop(server, prompts, c, 0, args.max_tokens, audio,
                                    seconds=args.seconds))
            for c in levels
        ]
    print_levels(results, floors)
    print(f"(streaming; requests: the answered ones; rows/step: mean batch size of the "
          f"decode steps; step: the engine's mean decode step; floor: one step of the "
          f"model's shapes at that batch size and KV length {kv_len} in a CUDA graph "
          f"(eagerly on a CPU), measured in this run)")


if __name__ == "__main__":
    main()

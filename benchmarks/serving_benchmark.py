"""Serving throughput and latency against the in-process model, as a printed table.

    python benchmarks/serving_benchmark.py [MODEL_DIR] [--concurrency 1,4,8,16]
        [--requests 32] [--max-tokens 64] [--device auto] [--torch-threads N]

Starts the server on MODEL_DIR (a subprocess on 127.0.0.1, free port) and runs
closed-loop streaming clients at each concurrency: every client sends its next request
as soon as the previous answer ends. TTFT is the time to the first content chunk.
In the same run, the same prompts go through the model in-process: sequential
``model.chat`` (greedy, same max tokens) and one left-padded ``model.generate`` of
batch 8. Only prompts whose greedy answer runs to the length limit are used, so every
request decodes exactly ``--max-tokens`` tokens everywhere. Without MODEL_DIR the tiny
test checkpoint is built in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
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


ENGINE_COUNTERS = ("prefills", "decode_steps", "completion_tokens")


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


def chat_body(prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "temperature": 0, "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def pick_prompts(server: ServerProcess, max_tokens: int, wanted: int) -> list[str]:
    """Prompts whose greedy answer runs to max_tokens (no early stop)."""
    chosen: list[str] = []
    with httpx.Client(timeout=600) as client:
        for prompt in CANDIDATE_PROMPTS:
            reply = client.post(server.api_url + "/chat/completions",
                                json=chat_body(prompt, max_tokens, stream=False)).json()
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


async def one_json_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> Sample:
    """A non-streamed request: like model.chat, the answer arrives whole (no TTFT)."""
    start = time.perf_counter()
    reply = await client.post(url, json=body)
    if reply.status_code != 200:
        raise RuntimeError(f"HTTP {reply.status_code}: {reply.text[:200]!r}")
    latency = time.perf_counter() - start
    return Sample(latency, latency, reply.json()["usage"]["completion_tokens"])


async def closed_loop(
    server: ServerProcess,
    prompts: list[str],
    concurrency: int,
    requests: int,
    max_tokens: int,
    stream: bool = True,
) -> LevelResult:
    url = server.api_url + "/chat/completions"
    samples: list[Sample] = []
    errors = 0
    next_index = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_index, errors
        while next_index < requests:
            index = next_index
            next_index += 1
            body = chat_body(prompts[index % len(prompts)], max_tokens, stream=stream)
            send = one_request if stream else one_json_request
            try:
                samples.append(await send(client, url, body))
            except Exception as exc:  # counted and reported, never hidden
                errors += 1
                print(f"  request {index} failed: {exc}", file=sys.stderr)

    limits = httpx.Limits(max_connections=concurrency + 4)
    before = engine_counters(server)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    after = engine_counters(server)
    engine = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in ENGINE_COUNTERS}
    return LevelResult(concurrency, requests, errors, wall, samples, engine)


@dataclass
class InProcess:
    chat_latencies: list[float]
    batch8_seconds: float
    batch8_tokens: int


def in_process_baselines(
    model_dir: Path, device: str, prompts: list[str], max_tokens: int, repeats: int
) -> InProcess:
    import torch

    from oai_audio_server.engine.loader import load_bundle
    from oai_audio_server.qwen.conversation import Conversation, TextItem
    from oai_audio_server.qwen.prompt import QwenPromptBuilder
    from oai_audio_server.settings import Settings

    bundle = load_bundle(Settings(model=str(model_dir), device=device))
    model, tokenizer = bundle.model, bundle.tokenizer
    greedy = {"do_sample": False, "top_p": None, "top_k": None, "temperature": None}

    with torch.inference_mode():
        model.chat(tokenizer, prompts[0], history=None, max_new_tokens=4, **greedy)  # warm-up
        latencies = []
        for i in range(repeats):
            start = time.perf_counter()
            model.chat(tokenizer, prompts[i % len(prompts)], history=None,
                       max_new_tokens=max_tokens, **greedy)
            latencies.append(time.perf_counter() - start)

        builder = QwenPromptBuilder(tokenizer, max_window_size=bundle.max_window_size)
        rows = [builder.build(Conversation(query=(TextItem(prompts[i % len(prompts)]),))).token_ids
                for i in range(8)]
        width = max(len(r) for r in rows)
        input_ids = torch.full((8, width), bundle.pad_token_id, dtype=torch.long)
        mask = torch.zeros((8, width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        input_ids, mask = input_ids.to(bundle.device), mask.to(bundle.device)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            out = model.generate(input_ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, pad_token_id=bundle.pad_token_id,
                                 **greedy)
            best = min(best, time.perf_counter() - start)
        tokens = int(out.shape[0] * (out.shape[1] - width))
    return InProcess(latencies, best, tokens)


def rows_per_step(result: LevelResult) -> float:
    """Average rows in a decode step: a prefill makes each row's first token, every other
    token comes from a decode step."""
    steps = result.engine["decode_steps"]
    decoded = result.engine["completion_tokens"] - len(result.samples)
    return decoded / steps if steps else float("nan")


def print_report(
    results: list[LevelResult], base: InProcess, max_tokens: int, mode: str
) -> None:
    print(f"{mode}:")
    header = (f"| {'clients':>7} | {'requests':>8} | {'errors':>6} | {'req/s':>7} | "
              f"{'tokens/s':>9} | {'TTFT p50':>9} | {'TTFT p95':>9} | {'lat p50':>8} | "
              f"{'lat p95':>8} | {'prefills':>8} | {'rows/step':>9} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in results:
        ttfts = [s.ttft * 1000 for s in r.samples]
        lats = [s.latency * 1000 for s in r.samples]
        print(f"| {r.concurrency:>7} | {r.requests:>8} | {r.errors:>6} | "
              f"{len(r.samples) / r.wall:>7.2f} | {r.tokens / r.wall:>9.1f} | "
              f"{percentile(ttfts, 50):>7.1f}ms | {percentile(ttfts, 95):>7.1f}ms | "
              f"{percentile(lats, 50):>6.1f}ms | {percentile(lats, 95):>6.1f}ms | "
              f"{r.engine['prefills']:>8.0f} | {rows_per_step(r):>9.2f} |")
    chat_p50 = statistics.median(base.chat_latencies) * 1000
    batch_tps = base.batch8_tokens / base.batch8_seconds
    print()
    print("(prefills: model calls that started requests; rows/step: mean batch size of the "
          "decode steps)")
    if mode.startswith("json"):
        print("(non-streamed: TTFT columns show the whole answer's latency)")
    print(f"in-process model.chat (sequential, greedy, {max_tokens} tokens): "
          f"latency p50 {chat_p50:.1f} ms over {len(base.chat_latencies)} calls")
    print(f"in-process model.generate batch 8 (left padding): {base.batch8_tokens} tokens in "
          f"{base.batch8_seconds * 1000:.1f} ms = {batch_tps:.1f} tokens/s")
    by_level = {r.concurrency: r for r in results}
    if 1 in by_level:
        server_p50 = percentile([s.latency * 1000 for s in by_level[1].samples], 50)
        print(f"server 1 client latency p50 / in-process chat latency p50: "
              f"{server_p50 / chat_p50:.3f} (target <= 1.03)")
    if 8 in by_level:
        eight = by_level[8]
        print(f"server 8 clients tokens/s / in-process batch-8 tokens/s: "
              f"{eight.tokens / eight.wall / batch_tps:.3f} (target >= 0.95)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", type=Path)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="CPU intra-op threads for the server (--cpu-threads) and the "
                        "in-process baseline alike (default: the server's own rule, one "
                        "fewer than the cores)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]

    work = Path(tempfile.mkdtemp(prefix="oas-bench-"))
    model_dir = args.model_dir
    if model_dir is None:
        from tiny_model import build_tiny_checkpoint

        model_dir = build_tiny_checkpoint(work / "tiny", seed=0)
    import torch

    from oai_audio_server.engine.loader import cpu_thread_count

    threads = cpu_thread_count(args.torch_threads)
    torch.set_num_threads(threads)  # the in-process baselines get what the server gets
    env: dict[str, str] = {}

    flags = ["--served-model-name", MODEL, "--device", args.device,
             "--cpu-threads", str(threads),
             "--max-batch-size", str(max(8, *levels)), "--max-queue", str(4 * max(levels))]
    with running_server(model_dir, work, *flags, env=env) as server:
        prompts = pick_prompts(server, args.max_tokens, wanted=8)
        print(f"model {model_dir}, {len(prompts)} prompts that run to {args.max_tokens} "
              f"tokens, device {args.device}, CPU threads {threads}, "
              f"cpus {os.cpu_count()}\n")
        asyncio.run(closed_loop(server, prompts, 2, 4, args.max_tokens))  # warm-up
        results = {
            mode: [
                asyncio.run(closed_loop(server, prompts, c, args.requests, args.max_tokens,
                                        stream=(mode == "streaming")))
                for c in levels
            ]
            for mode in ("streaming", "json (not streamed)")
        }
        base = in_process_baselines(model_dir, args.device, prompts, args.max_tokens,
                                    repeats=min(args.requests, 16))
    for mode, level_results in results.items():
        print_report(level_results, base, args.max_tokens, mode)
        print()


if __name__ == "__main__":
    main()

"""Serving throughput and latency against the in-process model, as printed tables.

    python benchmarks/serving_benchmark.py [MODEL_DIR] [--concurrency 1,4,8,16]
        [--requests 64] [--rounds 3] [--max-tokens 64] [--device auto] [--torch-threads N]

Starts the server on MODEL_DIR (a subprocess on 127.0.0.1, free port) and runs
closed-loop clients at each concurrency, streaming and not: every client sends its next
request as soon as the previous answer ends. TTFT is the time to the first content
chunk. Then the issue's two targets, in paired rounds: the same checkpoint in this
process (sequential ``model.chat``, and one left-padded ``model.generate`` of batch 8),
measured right before the server's 1-client latency and 8-client throughput, with the
median ratio over the rounds. Only prompts whose greedy answer runs to the length limit
are used, so every request decodes exactly ``--max-tokens`` tokens everywhere. Without
MODEL_DIR the tiny test checkpoint is built in a temporary directory.
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

    async def send(client: httpx.AsyncClient, index: int) -> None:
        nonlocal errors
        body = chat_body(prompts[index % len(prompts)], max_tokens, stream=stream)
        try:
            samples.append(await (one_request if stream else one_json_request)(client, url, body))
        except Exception as exc:  # counted and reported, never hidden
            errors += 1
            print(f"  request {index} failed: {exc}", file=sys.stderr)

    before = engine_counters(server)
    wall = await closed_loop_clients(requests, concurrency, send)
    after = engine_counters(server)
    engine = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in ENGINE_COUNTERS}
    return LevelResult(concurrency, requests, errors, wall, samples, engine)


@dataclass
class InProcess:
    chat_latencies: list[float]
    batch8_seconds: float
    batch8_tokens: int

    @property
    def chat_p50_ms(self) -> float:
        return statistics.median(self.chat_latencies) * 1000

    @property
    def batch8_tokens_per_second(self) -> float:
        return self.batch8_tokens / self.batch8_seconds


class Baselines:
    """The same checkpoint in this process: sequential ``model.chat`` and one left-padded
    ``model.generate`` of batch 8, greedy, every answer exactly max_tokens long."""

    def __init__(self, model_dir: Path, device: str, prompts: list[str], max_tokens: int):
        import torch

        from oai_audio_server.engine.loader import load_bundle
        from oai_audio_server.qwen.conversation import Conversation, TextItem
        from oai_audio_server.qwen.prompt import QwenPromptBuilder
        from oai_audio_server.settings import Settings

        self._torch = torch
        self._bundle = load_bundle(Settings(model=str(model_dir), device=device))
        self._prompts = prompts
        self._max_tokens = max_tokens
        self._greedy = {"do_sample": False, "top_p": None, "top_k": None, "temperature": None}
        builder = QwenPromptBuilder(self._bundle.tokenizer,
                                    max_window_size=self._bundle.max_window_size)
        rows = [builder.build(Conversation(query=(TextItem(prompts[i % len(prompts)]),)))
                .token_ids for i in range(8)]
        self._width = max(len(r) for r in rows)
        input_ids = torch.full((8, self._width), self._bundle.pad_token_id, dtype=torch.long)
        mask = torch.zeros((8, self._width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, self._width - len(row):] = torch.tensor(row)
            mask[i, self._width - len(row):] = 1
        self._input_ids = input_ids.to(self._bundle.device)
        self._mask = mask.to(self._bundle.device)
        with torch.inference_mode():  # warm-up
            self._bundle.model.chat(self._bundle.tokenizer, prompts[0], history=None,
                                    max_new_tokens=4, **self._greedy)

    def measure(self, chat_calls: int) -> InProcess:
        model, tokenizer = self._bundle.model, self._bundle.tokenizer
        with self._torch.inference_mode():
            latencies = []
            for i in range(chat_calls):
                start = time.perf_counter()
                model.chat(tokenizer, self._prompts[i % len(self._prompts)], history=None,
                           max_new_tokens=self._max_tokens, **self._greedy)
                latencies.append(time.perf_counter() - start)
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                out = model.generate(self._input_ids, attention_mask=self._mask,
                                     max_new_tokens=self._max_tokens,
                                     min_new_tokens=self._max_tokens,
                                     pad_token_id=self._bundle.pad_token_id, **self._greedy)
                best = min(best, time.perf_counter() - start)
        tokens = int(out.shape[0] * (out.shape[1] - self._width))
        return InProcess(latencies, best, tokens)


def rows_per_step(result: LevelResult) -> float:
    """Average rows in a decode step: a prefill makes each row's first token, every other
    token comes from a decode step."""
    steps = result.engine["decode_steps"]
    decoded = result.engine["completion_tokens"] - len(result.samples)
    return decoded / steps if steps else float("nan")


def print_table(results: list[LevelResult], mode: str) -> None:
    print(f"{mode}:")
    header = (f"| {'clients':>7} | {'requests':>8} | {'errors':>6} | {'req/s':>7} | "
              f"{'tokens/s':>9} | {'TTFT p50':>9} | {'TTFT p95':>9} | {'lat p50':>8} | "
              f"{'lat p95':>8} | {'prefills':>8} | {'rows/step':>9} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in results:
        ttfts = [s.ttft * 1000 for s in r.samples]
        lats = [s.latency * 1000 for s in r.samples]
        print(f"| {r.concurrency:>7} | {len(r.samples):>8} | {r.errors:>6} | "
              f"{len(r.samples) / r.wall:>7.2f} | {r.tokens / r.wall:>9.1f} | "
              f"{percentile(ttfts, 50):>7.1f}ms | {percentile(ttfts, 95):>7.1f}ms | "
              f"{percentile(lats, 50):>6.1f}ms | {percentile(lats, 95):>6.1f}ms | "
              f"{r.engine['prefills']:>8.0f} | {rows_per_step(r):>9.2f} |")
    print()


@dataclass
class TargetRound:
    mode: str
    one_client_p50_ms: float
    chat_p50_ms: float
    eight_clients_tps: float
    batch8_tps: float

    @property
    def latency_ratio(self) -> float:
        return self.one_client_p50_ms / self.chat_p50_ms

    @property
    def throughput_ratio(self) -> float:
        return self.eight_clients_tps / self.batch8_tps


def target_rounds(
    server: ServerProcess, baselines: Baselines, prompts: list[str], requests: int,
    max_tokens: int, rounds: int,
) -> list[TargetRound]:
    """The issue's two ratios, each server figure next to a baseline measured right
    before it: on a shared machine the speed drifts by tens of percent within minutes,
    so figures taken minutes apart would compare the machine, not the server."""
    found = []
    for _ in range(rounds):
        for mode in ("streaming", "json"):
            stream = mode == "streaming"
            base = baselines.measure(chat_calls=16)
            one = asyncio.run(closed_loop(server, prompts, 1, requests // 2, max_tokens, stream))
            eight = asyncio.run(closed_loop(server, prompts, 8, requests, max_tokens, stream))
            found.append(TargetRound(
                mode=mode,
                one_client_p50_ms=percentile([s.latency * 1000 for s in one.samples], 50),
                chat_p50_ms=base.chat_p50_ms,
                eight_clients_tps=eight.tokens / eight.wall,
                batch8_tps=base.batch8_tokens_per_second,
            ))
    return found


def print_targets(rounds: list[TargetRound], max_tokens: int) -> None:
    print(f"targets, {max_tokens} greedy tokens per request; in-process baselines: sequential "
          "model.chat, and model.generate of one left-padded batch of 8 (best of 3):")
    print("| mode      | 1 client p50 | model.chat p50 | ratio (<= 1.03) | 8 clients tok/s "
          "| batch-8 tok/s | ratio (>= 0.95) |")
    print("|-----------|--------------|----------------|-----------------|-----------------"
          "|---------------|-----------------|")
    for r in rounds:
        print(f"| {r.mode:<9} | {r.one_client_p50_ms:>10.1f}ms | {r.chat_p50_ms:>12.1f}ms | "
              f"{r.latency_ratio:>15.3f} | {r.eight_clients_tps:>15.1f} | {r.batch8_tps:>13.1f} "
              f"| {r.throughput_ratio:>15.3f} |")
    print()
    for mode in ("streaming", "json"):
        mine = [r for r in rounds if r.mode == mode]
        latency = [r.latency_ratio for r in mine]
        throughput = [r.throughput_ratio for r in mine]
        print(f"{mode}: median 1-client latency ratio {statistics.median(latency):.3f} "
              f"(range {min(latency):.3f}-{max(latency):.3f}, target <= 1.03); median 8-client "
              f"throughput ratio {statistics.median(throughput):.3f} "
              f"(range {min(throughput):.3f}-{max(throughput):.3f}, target >= 0.95)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", type=Path)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency")
    parser.add_argument("--rounds", type=int, default=3,
                        help="paired server/baseline rounds for the target ratios")
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

    flags = ["--served-model-name", MODEL, "--device", args.device,
             "--cpu-threads", str(threads),
             "--max-batch-size", str(max(8, *levels)), "--max-queue", str(4 * max(levels))]
    with running_server(model_dir, work, *flags) as server:
        prompts = pick_prompts(server, args.max_tokens, wanted=8)
        print(f"model {model_dir}, {len(prompts)} prompts that run to {args.max_tokens} "
              f"tokens, device {args.device}, CPU threads {threads}, "
              f"cpus {os.cpu_count()}\n")
        asyncio.run(closed_loop(server, prompts, 2, 4, args.max_tokens))  # warm-up
        for mode in ("streaming", "json (not streamed)"):
            print_table([
                asyncio.run(closed_loop(server, prompts, c, args.requests, args.max_tokens,
                                        stream=(mode == "streaming")))
                for c in levels
            ], mode)
        print("(requests: the answered ones; prefills: model calls that started requests; "
              "rows/step: mean batch size of the decode steps; not streamed, TTFT is the "
              "whole answer's latency)\n")
        baselines = Baselines(model_dir, args.device, prompts, args.max_tokens)
        rounds = target_rounds(server, baselines, prompts, args.requests, args.max_tokens,
                               args.rounds)
    print_targets(rounds, args.max_tokens)


if __name__ == "__main__":
    main()

"""Multi-turn conversations with audio, prefix caching on and off in the same run.

    python benchmarks/multi_turn.py [MODEL_DIR] [--conversations 4] [--turns 4]
        [--audio-seconds 75] [--max-tokens 16] [--torch-threads N] [--extra-flags "..."]

Each conversation sends its own audio (a different tone) with a question in turn 1, then
asks more text questions, sending the whole conversation each turn as chat clients do.
All conversations run at once, each a streamed chat request per turn. A server is
started with --prefix-caching and then one with --no-prefix-caching; for each, one row
per turn: time to first token (p50 and max over the conversations), prompt tokens and
the cached tokens usage reports; then one row per mode with the answer tokens per
second over the whole run, and the ratio of each turn's TTFT with caching to without
(the same prompt, so the same length: "cold"). Without MODEL_DIR the tiny test checkpoint
is built in a temporary directory (its text is random; the times are what count).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS_DIR))

from media import audio_part, tone, wav_bytes  # noqa: E402
from server_process import ServerProcess, running_server  # noqa: E402

MODES = (("on", "--prefix-caching"), ("off", "--no-prefix-caching"))


@dataclass
class TurnResult:
    ttft: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass
class Run:
    turns: list[list[TurnResult]] = field(default_factory=list)  # [turn][conversation]
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


def streamed_turn(client: httpx.Client, messages: list[object],
                  max_tokens: int) -> tuple[str, TurnResult]:
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    usage: dict[str, object] = {}
    with client.stream("POST", "/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {reply.read()[:200]!r}")
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                if choice["delta"].get("content"):
                    if first is None:
                        first = time.perf_counter() - started
                    text.append(choice["delta"]["content"])
            if chunk.get("usage"):
                usage = chunk["usage"]
    if first is None:  # an empty answer: the usage chunk is its first token
        first = time.perf_counter() - started
    details = usage.get("prompt_tokens_details") or {}
    assert isinstance(details, dict)
    return "".join(text), TurnResult(
        first, int(usage.get("prompt_tokens", 0)),  # type: ignore[call-overload]
        int(details.get("cached_tokens", 0)), int(usage.get("completion_tokens", 0)),  # type: ignore[call-overload]
    )


def conversation(server: ServerProcess, index: int, args: argparse.Namespace,
                 out: Run, lock: threading.Lock) -> None:
    audio = audio_part(wav_bytes(tone(args.audio_seconds, 180.0 + 37.0 * index)))
    messages: list[object] = [
        {"role": "user", "content": [audio, {"type": "text", "text": "What is this?"}]}
    ]
    try:
        with httpx.Client(base_url=server.api_url, timeout=600) as client:
            for turn in range(args.turns):
                answer, result = streamed_turn(client, messages, args.max_tokens)
                with lock:
                    out.turns[turn].append(result)
                messages += [{"role": "assistant", "content": answer},
                             {"role": "user", "content": f"Tell me more, part {turn + 2}."}]
    except Exception as exc:  # reported in the table, never hidden
        with lock:
            out.errors.append(f"{type(exc).__name__}: {exc}")


def run_mode(model_dir: Path, scratch: Path, flag: str, args: argparse.Namespace) -> Run:
    flags = ["--served-model-name", "bench", flag, *shlex.split(args.extra_flags)]
    if args.torch_threads:
        flags += ["--cpu-threads", str(args.torch_threads)]
    out = Run(turns=[[] for _ in range(args.turns)])
    lock = threading.Lock()
    with running_server(model_dir, scratch, *flags) as server:
        # Not timed: the first request of a server pays for warming up (allocator,
        # kernels, audio decoder), which would land on whichever mode runs first.
        with httpx.Client(base_url=server.api_url, timeout=600) as client:
            warm = audio_part(wav_bytes(tone(1.0, 100.0)))
            streamed_turn(client, [{"role": "user", "content": [warm]}], 2)
        started = time.perf_counter()
        threads = [threading.Thread(target=conversation, args=(server, i, args, out, lock))
                   for i in range(args.conversations)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(3600)
        out.seconds = time.perf_counter() - started
    return out


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", nargs="?")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--audio-seconds", type=float, default=75.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--torch-threads", type=int, default=0)
    parser.add_argument("--extra-flags", default="", help="more server flags, one string")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(args.model_dir) if args.model_dir else None
        if model_dir is None:
            from tiny_model import build_tiny_checkpoint

            model_dir = build_tiny_checkpoint(Path(scratch) / "tiny", seed=0)
        runs = {name: run_mode(model_dir, Path(scratch), flag, args) for name, flag in MODES}
    print(f"{args.conversations} conversations x {args.turns} turns, "
          f"{args.audio_seconds:g} s of audio each, {args.max_tokens} answer tokens a turn")
    print()
    print("| caching | turn | TTFT p50 ms | TTFT max ms | prompt tokens | cached tokens |")
    print("|---|---|---|---|---|---|")
    for name, run in runs.items():
        for turn, results in enumerate(run.turns, start=1):
            if not results:
                continue
            ttfts = [r.ttft for r in results]
            print(f"| {name} | {turn} | {ms(statistics.median(ttfts))} | {ms(max(ttfts))} | "
                  f"{statistics.mean(r.prompt_tokens for r in results):.0f} | "
                  f"{statistics.mean(r.cached_tokens for r in results):.0f} |")
    print()
    print("| caching | answers | errors | seconds | answer tokens/s |")
    print("|---|---|---|---|---|")
    for name, run in runs.items():
        tokens = sum(r.completion_tokens for results in run.turns for r in results)
        answers = sum(len(results) for results in run.turns)
        print(f"| {name} | {answers} | {len(run.errors)} | {run.seconds:.1f} | "
              f"{tokens / run.seconds:.1f} |")
        for message in sorted(set(run.errors))[:3]:
            print(f"  error: {message}")
    print()
    print("| turn | TTFT on / off (p50) |")
    print("|---|---|")
    on, off = runs["on"], runs["off"]
    for turn in range(args.turns):
        if on.turns[turn] and off.turns[turn]:
            ratio = (statistics.median(r.ttft for r in on.turns[turn])
                     / statistics.median(r.ttft for r in off.turns[turn]))
            print(f"| {turn + 1} | {ratio:.2f} |")


if __name__ == "__main__":
    main()

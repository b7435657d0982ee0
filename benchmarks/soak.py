"""Soak test: many concurrent clients for a bounded number of requests, then a report.

    python benchmarks/soak.py [MODEL_DIR] [--clients 32] [--requests 500] [--torch-threads N]

Mixes JSON and streamed requests, some with audio. Reports errors (should be 0), temp
files the server left behind (0), the RSS growth of the server and its engine process
together between the end of the warm-up and the end of the run (target < 5 %), and
their thread counts before and after.
Without MODEL_DIR the tiny test checkpoint is built in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS_DIR))

from load import closed_loop_clients  # noqa: E402
from media import audio_part, tone, wav_bytes  # noqa: E402
from server_process import ServerProcess, running_server  # noqa: E402

MODEL = "soak"
PROMPTS = ["hi", "Describe it", "What can you hear?", "Hello", "Say something",
           "Transcribe the audio.", "Where are we?"]
AUDIOS = [wav_bytes(tone(seconds, frequency))
          for seconds, frequency in ((0.5, 220.0), (1.0, 440.0), (2.5, 660.0))]


def proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def process_tree(pid: int) -> list[int]:
    """The server and its child processes (the engine process)."""
    found = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent == pid:
                found += process_tree(int(entry.name))
    return found


def tree_status(pid: int, key: str) -> int:
    return sum(proc_status(p, key) for p in process_tree(pid))


def request_body(i: int) -> dict[str, Any]:
    text = PROMPTS[i % len(PROMPTS)]
    content: Any = text
    if i % 4 == 0:
        content = [{"type": "text", "text": text}, audio_part(AUDIOS[i % len(AUDIOS)])]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": 8 + (i % 7) * 8, "temperature": 0 if i % 3 else 0.8,
            "seed": i, "stream": bool(i % 2)}


async def run_requests(server: ServerProcess, count: int, clients: int) -> tuple[int, list[str]]:
    """How many requests got a whole, error-free answer, and what went wrong with the rest."""
    url = server.api_url + "/chat/completions"
    errors: list[str] = []
    answered = 0

    async def send(client: httpx.AsyncClient, index: int) -> None:
        nonlocal answered
        body = request_body(index)
        try:
            reply = await client.post(url, json=body)
            if reply.status_code != 200:
                errors.append(f"{index}: HTTP {reply.status_code} {reply.text[:200]}")
            elif body["stream"] and not reply.text.endswith("data: [DONE]\n\n"):
                errors.append(f"{index}: stream did not finish: {reply.text[-200:]}")
            elif body["stream"] and '"error"' in reply.text:
                errors.append(f"{index}: error event: {reply.text[-300:]}")
            else:
                answered += 1
        except httpx.HTTPError as exc:
            errors.append(f"{index}: {type(exc).__name__}: {exc}")

    await closed_loop_clients(count, clients, send)
    return answered, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", type=Path)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="the server's --cpu-threads (0: its own default)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="oas-soak-"))
    model_dir = args.model_dir
    if model_dir is None:
        from tiny_model import build_tiny_checkpoint

        model_dir = build_tiny_checkpoint(work / "tiny", seed=0)
    server_tmp = work / "server-tmp"
    server_tmp.mkdir()
    env = {"TMPDIR": str(server_tmp)}
    flags = ["--served-model-name", MODEL, "--device", args.device,
             "--cpu-threads", str(args.torch_threads),
             "--max-queue", str(4 * args.clients)]
    with running_server(model_dir, work, *flags, env=env) as server:
        pid = server.process.pid
        _, warm_errors = asyncio.run(run_requests(server, args.warmup, args.clients))
        time.sleep(0.5)
        processes = len(process_tree(pid))
        rss_before, threads_before = tree_status(pid, "VmRSS"), tree_status(pid, "Threads")
        files_before = set(os.listdir(server_tmp))
        start = time.perf_counter()
        errors: list[str] = []
        answered = 0
        rss_trace: list[int] = []  # RSS after each fifth of the run: a leak keeps climbing
        for fifth in range(5):
            share = args.requests * (fifth + 1) // 5 - args.requests * fifth // 5
            done, failed = asyncio.run(run_requests(server, share, args.clients))
            answered += done
            errors += failed
            rss_trace.append(tree_status(pid, "VmRSS"))
        wall = time.perf_counter() - start
        time.sleep(0.5)
        rss_after, threads_after = tree_status(pid, "VmRSS"), tree_status(pid, "Threads")
        processes_after = len(process_tree(pid))
        leaked = sorted(set(os.listdir(server_tmp)) - files_before)
        health = httpx.get(server.base_url + "/health").json()

    for line in (warm_errors + errors)[:10]:
        print("error:", line)
    growth = 100 * (rss_after - rss_before) / rss_before
    rows = [
        ("requests (after warm-up)", f"{args.requests} with {args.clients} clients"),
        ("wall time", f"{wall:.1f} s ({args.requests / wall:.1f} req/s)"),
        ("answered", f"{answered} of {args.requests}"),
        ("errors", f"{len(errors)} (warm-up {len(warm_errors)})"),
        ("leaked temp files", str(len(leaked))),
        ("RSS (all processes) after warm-up / at end",
         f"{rss_before / 1024:.1f} MiB / {rss_after / 1024:.1f} MiB"),
        ("RSS growth", f"{growth:+.2f} % (target < 5 %)"),
        ("RSS after each fifth", " / ".join(f"{kib / 1024:.0f}" for kib in rss_trace) + " MiB"),
        ("processes after warm-up / at end", f"{processes} / {processes_after}"),
        ("threads after warm-up / at end", f"{threads_before} / {threads_after}"),
        ("engine at end", f"batch_size {health['batch_size']:.0f}, "
                          f"queue_depth {health['queue_depth']:.0f}, "
                          f"peak batch {health['peak_batch_size']:.0f}, "
                          f"failed {health['failed']:.0f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"| {'measure':<{width}} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")


if __name__ == "__main__":
    main()

"""The GPU path in one prepared script: it works, it is right, and how fast it is against
the hardware floor measured in the same run.

    python benchmarks/gpu_check.py [--device cuda] [--out DIR] [--seconds 20] [--smoke]

In order, failing fast (each step prints its result and time, and the JSON report in
``--out`` ($OUT when set) is rewritten after every step):

1. imports and one CUDA graph capture;
2. the full-size Qwen-Audio-Chat model in bfloat16, built on the device from the meta
   device with random weights (``--random-weights``: no file written or read);
3. graph replay against eager logits at 1, 32 and 64 rows within a tolerance, with the
   attention backend pinned to ``triton`` (a silent fallback would fail here), and the
   Triton attention against the sdpa path on the same cache;
4. the engine's closed loop at 1/8/32/64/128 clients (6 s of audio plus a question,
   greedy, 112-144 new tokens so clients do not move in waves): tokens/s, TTFT, the
   decode step (from one step's start to the next), then the HTTP server at 32 streaming
   clients on the same random model;
5. prefix caching: conversations about 3 x 30 s of audio, the cache on and off: turn 2's
   time to first token against the same prompt cold, and the answer tokens/s of 32
   four-turn conversations at once;
6. the floor (benchmarks/decode_floor.py, the same weight shapes in a CUDA graph), last,
   after the engine's memory is freed; every figure is printed as a ratio to it.

``--smoke`` runs the same steps on the CPU with the tiny test shapes and short levels
(what the test suite runs to keep the script working).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

REPORT: dict[str, Any] = {"steps": {}}


def record(out: Path, step: str, result: dict[str, Any], started: float) -> None:
    result["seconds"] = round(time.perf_counter() - started, 2)
    REPORT["steps"][step] = result
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(REPORT, indent=2))
    print(f"[{step}] {json.dumps(result)}", flush=True)


def step_imports(device_name: str) -> dict[str, Any]:
    import torch

    result: dict[str, Any] = {"torch": torch.__version__, "device": device_name}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    if device_name.startswith("cuda"):
        x = torch.ones(4, 4, device=device_name)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = x @ x
        graph.replay()
        torch.cuda.synchronize()
        assert float(y.sum()) == 64.0, "a captured graph computed the wrong value"
        result["gpu"] = torch.cuda.get_device_name(device_name)
        result["graph_capture"] = "ok"
    return result


def build_model(model_dir: Path, device: str, smoke: bool) -> Any:
    from oai_audio_server.engine.loader import load_bundle
    from oai_audio_server.settings import Settings

    dtype = "float32" if smoke else "bfloat16"
    return load_bundle(Settings(model=str(model_dir), device=device, dtype=dtype,
                                random_weights=not smoke, max_model_len=4096))


def step_parity(bundle: Any, backend: str, smoke: bool) -> dict[str, Any]:
    """Graph replay == eager at 1/32/64 rows; triton == sdpa attention (same cache)."""
    import torch
    from paged_driver import PagedDriver

    from oai_audio_server.engine.runner import ModelRunner

    model = bundle.model
    result: dict[str, Any] = {"backend": backend}
    rng = random.Random(0)
    for rows in (1, 32, 64):
        driver = PagedDriver(model, max_len=bundle.max_model_len, rows=rows,
                             backend=backend, device=bundle.device,
                             num_blocks=rows * 40, vocab_limit=bundle.vocab_limit)
        top = min(5000, bundle.vocab_limit - 1)
        prompts = [[rng.randrange(1, top) for _ in range(rng.randrange(20, 300))]
                   for _ in range(rows)]
        with torch.inference_mode():
            driver.prefill(prompts, chunk=512)
            tokens = [rng.randrange(1, top) for _ in range(rows)]
            # Eager step on this driver's runner...
            eager = driver.decode(tokens).float().clone()
            # ...and the same step replayed from a graph captured on a twin runner that
            # shares the cache and the device rows.
            twin = ModelRunner(model, driver.runner.cache, bundle.device, capacity=rows,
                               max_len=bundle.max_model_len, vocab_limit=bundle.vocab_limit,
                               use_graphs=False, backend=backend)
            twin.rows = driver.runner.rows  # the rows as the eager step left them
            if bundle.device.type == "cuda":
                # Capture clears the device rows (padding rows for the warm-ups): keep the
                # rows the eager step read, and put them back for the replay.
                state = [t.clone() for t in (twin.rows.tokens, twin.rows.positions,
                                             twin.rows.variants, twin.rows.block_tables)]
                twin._capture_graphs()  # noqa: SLF001 (the check drives the runner directly)
                for tensor, saved in zip((twin.rows.tokens, twin.rows.positions,
                                          twin.rows.variants, twin.rows.block_tables),
                                         state, strict=True):
                    tensor.copy_(saved)
            longest = max(driver.lengths) - 1
            # The twin's step writes the same keys again at the same slots: same inputs.
            replayed = twin.decode(rows, longest).float()
            graphs = twin.graphs_captured
            scale = eager.abs().max().item()
            error = (replayed - eager).abs().max().item()
            argmax_same = float((replayed.argmax(-1) == eager.argmax(-1)).float().mean())
            if backend == "triton":
                sdpa = PagedDriver(model, max_len=bundle.max_model_len, rows=rows,
                                   backend="sdpa", device=bundle.device,
                                   num_blocks=rows * 40, vocab_limit=bundle.vocab_limit)
                sdpa.prefill(prompts, chunk=512)
                other = sdpa.decode(tokens).float()
                relative = (other - eager).abs().max().item() / scale
                result[f"triton_vs_sdpa_rel_{rows}"] = relative
                assert relative <= 2e-2, f"triton attention differs from sdpa: {relative}"
        result[f"graph_vs_eager_rel_{rows}"] = error / scale
        result[f"argmax_agree_{rows}"] = argmax_same
        result[f"graphs_{rows}"] = graphs
        tolerance = 1e-5 if smoke else 2e-2
        assert error / scale <= tolerance, f"graph replay differs at {rows} rows: {error / scale}"
        del driver, twin
    return result


async def engine_level(engine: Any, requests: list[Any], clients: int,
                       seconds: float) -> dict[str, Any]:
    from oai_audio_server.engine.types import Failed, Finished, TextDelta

    ttfts: list[float] = []
    tokens = 0
    errors = 0
    deadline = time.perf_counter() + seconds
    index = 0

    async def client() -> None:
        nonlocal tokens, errors, index
        while time.perf_counter() < deadline:
            request = requests[index % len(requests)]
            index += 1
            started = time.perf_counter()
            first = None
            handle = engine.submit(request)
            async for event in handle.events():
                if isinstance(event, TextDelta) and first is None:
                    first = time.perf_counter() - started
                elif isinstance(event, Finished):
                    tokens += event.completion_tokens
                elif isinstance(event, Failed):
                    errors += 1
            ttfts.append(first if first is not None else time.perf_counter() - started)

    before = engine.stats()
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - started
    after = engine.stats()
    steps = after["decode_steps"] - before["decode_steps"]
    ttfts.sort()
    return {
        "clients": clients, "tokens_per_s": tokens / wall, "errors": errors,
        "requests": len(ttfts),
        "ttft_p50_ms": 1000 * ttfts[len(ttfts) // 2] if ttfts else None,
        "ttft_p95_ms": 1000 * ttfts[int(0.95 * (len(ttfts) - 1))] if ttfts else None,
        "step_ms": (after["decode_time_us"] - before["decode_time_us"]) / 1000 / max(steps, 1),
        "rows_per_step": (after["completion_tokens"] - before["completion_tokens"]
                          - (after["finished"] - before["finished"])) / max(steps, 1),
        "preemptions": after["preemptions"] - before["preemptions"],
    }


def step_engine(bundle: Any, levels: list[int], seconds: float) -> dict[str, Any]:
    from media import tone

    from oai_audio_server.audio.types import PreparedAudio
    from oai_audio_server.engine.cache_plan import CacheOptions
    from oai_audio_server.engine.core import BatchingEngine
    from oai_audio_server.engine.types import GenerationRequest, SamplingParams
    from oai_audio_server.qwen.conversation import AudioItem, Conversation, TextItem
    from oai_audio_server.qwen.prompt import QwenPromptBuilder

    builder = QwenPromptBuilder(bundle.tokenizer, max_window_size=bundle.max_window_size)
    audio = PreparedAudio("tone", 6.0, (bundle.mel.extract(tone(6.0, 220.0)),))
    rng = random.Random(1)
    questions = ["What can you hear?", "Describe the sound.", "What does the speaker say?",
                 "Is there music?", "Transcribe the audio.", "Which language is it?"]
    requests = []
    for i in range(64):
        prompt = builder.build(Conversation(query=(AudioItem(audio),
                                                   TextItem(questions[i % len(questions)]))))
        requests.append(GenerationRequest(f"g{i}", prompt.token_ids, prompt.audio_segments,
                                          SamplingParams(rng.randint(112, 144), 0.0)))
    engine = BatchingEngine(lambda: bundle, max_batch_size=max(levels), max_queue=1024,
                            join_wait_steps=2,
                            # Its 64 requests share a prompt prefix: measured without the
                            # prefix cache, as before it existed (step_prefix measures it).
                            cache=CacheOptions(attention_backend="auto", prefix_caching=False))
    engine.start()
    while not engine.ready:
        if engine.load_error is not None:
            raise engine.load_error
        time.sleep(0.05)
    result: dict[str, Any] = {
        "backend": engine.runner.backend if engine.runner else None,
        "graphs": engine.runner.graphs_captured if engine.runner else 0,
        "kv_blocks": engine.stats()["kv_blocks_total"],
    }
    try:
        asyncio.run(engine_level(engine, requests, 2, min(seconds, 5.0)))  # warm-up
        result["levels"] = [asyncio.run(engine_level(engine, requests, c, seconds))
                            for c in levels]
    finally:
        engine.close()
    return result


async def conversation(engine: Any, builder: Any, audio: Any, turns: int, max_tokens: int,
                       ttfts: list[list[float]]) -> int:
    """One conversation about ``audio``, each turn sending the whole history; the time to
    first token of each turn goes to ``ttfts[turn]``. Returns the answer tokens."""
    from oai_audio_server.engine.types import (
        Failed,
        Finished,
        GenerationRequest,
        SamplingParams,
        TextDelta,
    )
    from oai_audio_server.qwen.conversation import (
        AudioItem,
        Conversation,
        HistoryTurn,
        TextItem,
    )

    history: tuple[Any, ...] = ()
    query: tuple[Any, ...] = (AudioItem(audio), TextItem("What is this?"))
    tokens = 0
    for turn in range(turns):
        prompt = builder.build(Conversation(history=history, query=query))
        started = time.perf_counter()
        handle = engine.submit(GenerationRequest(
            f"{audio.digest}-{turn}", prompt.token_ids, prompt.audio_segments,
            SamplingParams(max_tokens, 0.0)))
        first = None
        parts: list[str] = []
        async for event in handle.events():
            if first is None:
                first = time.perf_counter() - started
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, Finished):
                tokens += event.completion_tokens
            elif isinstance(event, Failed):
                raise RuntimeError(str(event.error))
        ttfts[turn].append(first or 0.0)
        history = (*history, HistoryTurn(query, "".join(parts)))
        query = (TextItem(f"Tell me more, part {turn + 2}."),)
    return tokens


async def conversations(engine: Any, builder: Any, audios: list[Any], turns: int,
                        max_tokens: int, ttfts: list[list[float]]) -> int:
    counts = await asyncio.gather(*(
        conversation(engine, builder, audio, turns, max_tokens, ttfts) for audio in audios))
    return sum(counts)


def step_prefix(bundle: Any, smoke: bool) -> dict[str, Any]:
    """Prefix caching: conversations about 3 x 30 s of audio (10 s with --smoke), 4
    turns each, with the cache on and off in the same run: turn 2's time to first token
    alone (against the same prompt without the cache: cold), and the answer tokens/s of
    32 conversations at once (2 with --smoke)."""
    from media import tone

    from oai_audio_server.audio.types import PreparedAudio
    from oai_audio_server.engine.cache_plan import CacheOptions
    from oai_audio_server.engine.core import BatchingEngine
    from oai_audio_server.qwen.prompt import QwenPromptBuilder

    builder = QwenPromptBuilder(bundle.tokenizer, max_window_size=bundle.max_window_size)
    seconds, clients = (10.0, 2) if smoke else (90.0, 32)

    def clip(index: int) -> PreparedAudio:
        wave = tone(seconds, 150.0 + 13.0 * index)
        pieces = [wave[i : i + 480000] for i in range(0, len(wave), 480000)]
        return PreparedAudio(f"a{index}", seconds,
                             tuple(bundle.mel.extract(piece) for piece in pieces))

    result: dict[str, Any] = {"audio_seconds": seconds, "clients": clients}
    for caching in (True, False):
        engine = BatchingEngine(lambda: bundle, max_batch_size=clients, max_queue=1024,
                                cache=CacheOptions(prefix_caching=caching))
        engine.start()
        while not engine.ready:
            if engine.load_error is not None:
                raise engine.load_error
            time.sleep(0.05)
        try:
            alone: list[list[float]] = [[] for _ in range(2)]
            asyncio.run(conversation(engine, builder, clip(999), 2, 8, alone))  # warm-up
            alone = [[] for _ in range(2)]
            asyncio.run(conversation(engine, builder, clip(0), 2, 8, alone))
            many: list[list[float]] = [[] for _ in range(4)]
            audios = [clip(1 + i) for i in range(clients)]
            started = time.perf_counter()
            tokens = asyncio.run(conversations(engine, builder, audios, 4, 64, many))
            wall = time.perf_counter() - started
            stats = engine.stats()
        finally:
            engine.close()
        name = "on" if caching else "off"
        result[name] = {
            "turn1_ttft_ms": 1000 * alone[0][0], "turn2_ttft_ms": 1000 * alone[1][0],
            "tokens_per_s": tokens / wall,
            "turn_ttft_p50_ms": [1000 * sorted(t)[len(t) // 2] for t in many],
            "hit_tokens": stats["prefix_cache_hit_tokens"],
            "miss_tokens": stats["prefix_cache_miss_tokens"],
        }
    result["turn2_vs_cold"] = result["on"]["turn2_ttft_ms"] / result["off"]["turn2_ttft_ms"]
    result["tokens_per_s_on_vs_off"] = (result["on"]["tokens_per_s"]
                                        / result["off"]["tokens_per_s"])
    return result


def step_http(model_dir: Path, device: str, clients: int, seconds: float,
              smoke: bool) -> dict[str, Any]:
    from server_process import running_server
    from serving_benchmark import closed_loop, make_audio, pick_prompts

    work = Path(tempfile.mkdtemp(prefix="oas-gpu-http-"))
    flags = ["--served-model-name", "bench", "--device", device, "--max-batch-size",
             str(max(clients, 8)), "--max-queue", str(4 * clients), "--max-model-len", "4096"]
    if not smoke:
        flags += ["--random-weights", "--dtype", "bfloat16"]
    audio = make_audio(6.0)
    with running_server(model_dir, work, *flags) as server:
        prompts = pick_prompts(server, 128, wanted=4, audio=audio)
        level = asyncio.run(closed_loop(server, prompts, clients, 0, 128, audio,
                                        seconds=seconds))
    ttfts = sorted(s.ttft for s in level.samples)
    return {
        "clients": clients, "tokens_per_s": level.tokens / level.wall, "errors": level.errors,
        "requests": level.requests,
        "ttft_p95_ms": 1000 * ttfts[int(0.95 * (len(ttfts) - 1))] if ttfts else None,
        "step_ms": level.engine["decode_time_us"] / 1000 / max(level.engine["decode_steps"], 1),
    }


def step_floor(config: dict[str, Any], levels: list[int], device: str,
               smoke: bool) -> dict[str, Any]:
    import torch
    from decode_floor import decoder_shape, floor_step_ms

    dtype = torch.float32 if smoke else torch.bfloat16
    kv_len = 512
    return {str(c): floor_step_ms(decoder_shape(config), c, kv_len, torch.device(device), dtype)
            for c in levels}


def print_ratios() -> None:
    steps = REPORT["steps"]
    floor = steps.get("floor", {})
    engine = steps.get("engine", {}).get("levels", [])
    print("\nclients | tokens/s | floor tokens/s | ratio | step ms | floor ms | step/floor | "
          "TTFT p95 ms | errors")
    for level in engine:
        f = floor.get(str(level["clients"])) or 0.0
        floor_tps = level["clients"] * 1000 / f if f else 0.0
        ratio = level["tokens_per_s"] / floor_tps if floor_tps else 0.0
        step_ratio = level["step_ms"] / f if f else 0.0
        print(f"{level['clients']:7d} | {level['tokens_per_s']:8.1f} | {floor_tps:14.1f} | "
              f"{ratio:5.2f} | {level['step_ms']:7.2f} | {f:8.2f} | {step_ratio:10.2f} | "
              f"{level['ttft_p95_ms'] or 0:11.0f} | {level['errors']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--levels", default="1,8,32,64,128")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny shapes, short levels: keeps the script working")
    parser.add_argument("--skip-http", action="store_true")
    args = parser.parse_args()
    levels = [int(c) for c in args.levels.split(",")]
    device = "cpu" if args.smoke else args.device
    if device == "cuda":
        device = "cuda:0"
    started = time.perf_counter()
    record(args.out, "imports", step_imports(device), started)

    import torch

    work = Path(tempfile.mkdtemp(prefix="oas-gpu-check-"))
    started = time.perf_counter()
    if args.smoke:
        from tiny_model import build_tiny_checkpoint

        model_dir = build_tiny_checkpoint(work / "tiny", seed=0)
    else:
        from random_checkpoint import build

        model_dir = build(work / "full", full_size=True, device=torch.device(device),
                          dtype=torch.bfloat16, weights=False)
    bundle = build_model(model_dir, device, args.smoke)
    params = sum(p.numel() for p in bundle.model.parameters())
    record(args.out, "model", {"parameters": params, "dtype": str(bundle.dtype)}, started)

    started = time.perf_counter()
    backend = "sdpa" if args.smoke else "triton"
    record(args.out, "parity", step_parity(bundle, backend, args.smoke), started)

    started = time.perf_counter()
    record(args.out, "engine", step_engine(bundle, levels, args.seconds), started)
    started = time.perf_counter()
    record(args.out, "prefix", step_prefix(bundle, args.smoke), started)
    config = json.loads((model_dir / "config.json").read_text())
    del bundle
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    if not args.skip_http:
        started = time.perf_counter()
        record(args.out, "http", step_http(model_dir, device, 32 if not args.smoke else 2,
                                           args.seconds, args.smoke), started)
    started = time.perf_counter()
    record(args.out, "floor", step_floor(config, levels, device, args.smoke), started)
    print_ratios()


if __name__ == "__main__":
    main()

"""The native engine on a GPU, in one script: parity and graphs first, then speed.

    python benchmarks/cuda_check.py [--device cuda] [--skip-benchmark]

1. Parity: the tiny test checkpoint in float32 on the device, CUDA graphs on, answers a
   set of greedy requests (text, audio, a 3000-token prompt, rows joining mid-way) with
   the same tokens as the same engine on the CPU, and reports how many graphs it
   captured (0 means every step ran eagerly: the log says why).
2. Speed: benchmarks/serving_benchmark.py --full-size (1/8/32/64 clients next to the
   decode floor), unless --skip-benchmark.

On a CPU (``--device cpu``) step 1 compares the CPU with itself: a smoke test of the
script.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS_DIR))
sys.path.insert(0, str(TESTS_DIR.parent))

from media import tone, wav_bytes  # noqa: E402
from tiny_model import build_tiny_checkpoint  # noqa: E402

from oai_audio_server.audio.decode import decode_audio  # noqa: E402
from oai_audio_server.audio.types import PreparedAudio  # noqa: E402
from oai_audio_server.engine.core import BatchingEngine  # noqa: E402
from oai_audio_server.engine.loader import ModelBundle, load_bundle  # noqa: E402
from oai_audio_server.engine.types import (  # noqa: E402
    Finished,
    GenerationRequest,
    SamplingParams,
)
from oai_audio_server.qwen.conversation import AudioItem, Conversation, TextItem  # noqa: E402
from oai_audio_server.qwen.prompt import QwenPromptBuilder  # noqa: E402
from oai_audio_server.settings import Settings  # noqa: E402


def requests_for(bundle: ModelBundle) -> list[GenerationRequest]:
    builder = QwenPromptBuilder(bundle.tokenizer, max_window_size=bundle.max_window_size)
    samples = decode_audio(wav_bytes(tone(2.0, 440.0)), format_hint="wav", max_seconds=30)
    audio = PreparedAudio("tone", 2.0, (bundle.mel.extract(samples),))
    long_text = " ".join(f"word{i % 97}" for i in range(1500))
    items = [
        (TextItem("Hello"),), (AudioItem(audio), TextItem("What is said?")),
        (TextItem(long_text),), (TextItem("Say something"),), (TextItem("hi"),),
    ]
    out = []
    for i, query in enumerate(items):
        prompt = builder.build(Conversation(query=query))
        out.append(GenerationRequest(f"r{i}", prompt.token_ids, prompt.audio_segments,
                                     SamplingParams(max_tokens=40 + 10 * i, temperature=0.0)))
    return out


def answers(bundle: ModelBundle, requests: list[GenerationRequest]) -> tuple[list, int]:
    engine = BatchingEngine(lambda: bundle, max_batch_size=8, join_wait_steps=0)
    engine.start()
    while not engine.ready:
        if engine.load_error is not None:
            raise engine.load_error
        time.sleep(0.05)

    async def run() -> list[list[int]]:
        handles = []
        for request in requests:  # staggered: rows join a running batch
            handles.append(engine.submit(request))
            await asyncio.sleep(0.05)
        out = []
        for handle in handles:
            async for event in handle.events():
                if isinstance(event, Finished):
                    out.append(event.token_ids)
                elif not hasattr(event, "text"):
                    raise RuntimeError(str(event))
        return out

    try:
        result = asyncio.run(asyncio.wait_for(run(), 600))
        graphs = engine.runner.graphs_captured if engine.runner else 0
    finally:
        engine.close()
    return result, graphs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-benchmark", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="oas-cuda-check-"))
    checkpoint = build_tiny_checkpoint(work / "tiny")
    device = load_bundle(Settings(model=str(checkpoint), device=args.device, dtype="float32"))
    cpu = load_bundle(Settings(model=str(checkpoint), device="cpu", dtype="float32"))
    expected, _ = answers(cpu, requests_for(cpu))
    got, graphs = answers(device, requests_for(device))
    same = sum(a == b for a, b in zip(got, expected, strict=True))
    print(f"parity on {args.device}: {same} of {len(expected)} greedy answers equal the CPU's "
          f"({sum(len(a) for a in got)} tokens); {graphs} CUDA graphs captured")
    if same != len(expected):
        for a, b in zip(got, expected, strict=True):
            if a != b:
                index = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                             min(len(a), len(b)))
                print(f"  first difference at token {index} of {len(b)}")
    if not args.skip_benchmark:
        subprocess.run([sys.executable, str(Path(__file__).parent / "serving_benchmark.py"),
                        "--full-size", "--device", args.device], check=True)
    sys.exit(0 if same == len(expected) else 1)


if __name__ == "__main__":
    main()

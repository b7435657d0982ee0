"""Audio intake benchmark: in-process PyAV decode + features vs the official ffmpeg CLI path.

Run: python benchmarks/intake_benchmark.py [--runs N] [--seconds S]

For each format, times ``decode_audio`` + log-mel features over N runs and, when an
``ffmpeg`` binary is on PATH, the official loader's path (ffmpeg subprocess to s16le,
then the same features) in the same run. Then shows that a repeated audio through
``AudioIntake`` costs no decode.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# The tests' own audio encoder and mel filterbank, so the benchmark needs no checkpoint.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from media import encode  # noqa: E402
from tiny_model import slaney_mel_filterbank  # noqa: E402

from oai_audio_server.audio import AudioIntake, MelFeatureExtractor, decode_audio  # noqa: E402
from oai_audio_server.settings import Settings


def _signal(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    sweep = np.sin(2 * np.pi * (200 * t + 150 * t * t))
    return (0.3 * envelope * sweep).astype(np.float32)


def _encode(container: str, codec: str, rate: int, seconds: float) -> bytes:
    return encode(_signal(seconds, rate), rate, container=container, codec=codec, channels=2)


def _ffmpeg_decode(ffmpeg: str, data: bytes) -> np.ndarray:
    command = [ffmpeg, "-nostdin", "-threads", "0", "-i", "pipe:0"]
    command += ["-f", "s16le", "-ac", "1", "-acodec", "pcm_s16le", "-ar", "16000", "-"]
    result = subprocess.run(command, input=data, capture_output=True, check=True)
    return np.frombuffer(result.stdout, np.int16).astype(np.float32) / 32768.0


def _time(runs: int, work: Callable[[], object]) -> float:
    work()  # warm-up
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    extractor = MelFeatureExtractor(slaney_mel_filterbank())
    formats = {
        "mp3": _encode("mp3", "libmp3lame", 44100, args.seconds),
        "flac": _encode("flac", "flac", 48000, args.seconds),
        "webm/opus": _encode("webm", "libopus", 48000, args.seconds),
    }
    ffmpeg = shutil.which("ffmpeg")
    print(f"{args.seconds:g} s of 44.1/48 kHz stereo audio, median of {args.runs} runs\n")
    header = f"{'format':<10} {'bytes':>8} {'decode ms':>10} {'+features ms':>13}"
    if ffmpeg:
        header += f" {'ffmpeg CLI+features ms':>23} {'ratio':>6}"
        header += f" {'official request ms':>20} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for name, data in formats.items():

        def decode_only(data: bytes = data) -> object:
            return decode_audio(data, format_hint=None, max_seconds=600)

        def decode_and_features(data: bytes = data) -> object:
            return extractor.extract(decode_audio(data, format_hint=None, max_seconds=600))

        decode_ms = _time(args.runs, decode_only)
        total_ms = _time(args.runs, decode_and_features)
        row = f"{name:<10} {len(data):>8} {decode_ms:>10.2f} {total_ms:>13.2f}"
        if ffmpeg:

            def official(data: bytes = data, binary: str = ffmpeg) -> object:
                return extractor.extract(_ffmpeg_decode(binary, data))

            cli_ms = _time(args.runs, official)
            row += f" {cli_ms:>23.2f} {cli_ms / total_ms:>5.1f}x"

            # The official make_context runs process_audio once for the turn and once
            # more for the whole prompt: two decodes of every audio per chat request.
            def official_request(work: Callable[[], object] = official) -> object:
                work()
                return work()

            request_ms = _time(args.runs, official_request)
            row += f" {request_ms:>20.2f} {request_ms / total_ms:>5.1f}x"
        print(row)
    if not ffmpeg:
        print("\nffmpeg not found: baseline skipped")

    intake = AudioIntake(Settings(), extractor)

    async def repeated() -> tuple[float, float]:
        first_started = time.perf_counter()
        await intake.from_bytes(formats["flac"], None)
        first = time.perf_counter() - first_started
        again_started = time.perf_counter()
        for _ in range(10):
            await intake.from_bytes(formats["flac"], None)
        return first * 1000, (time.perf_counter() - again_started) * 100

    first_ms, again_ms = asyncio.run(repeated())
    stats = intake.stats
    print(
        f"\nAudioIntake, one flac 11 times: first {first_ms:.2f} ms, repeats {again_ms:.3f} ms each"
    )
    print(
        f"decodes={stats.decodes} cache_hits={stats.cache_hits} "
        f"cache_misses={stats.cache_misses} cache_entries={stats.cache_entries} "
        f"cache_bytes={stats.cache_bytes}"
    )


if __name__ == "__main__":
    main()

"""Audio made by the tests themselves (nothing is read from outside the repo)."""

from __future__ import annotations

import base64
import io
import math
import wave
from fractions import Fraction

import av
import numpy as np

LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1", 8: "7.1"}


def tone(seconds: float, frequency: float = 440.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * math.pi * frequency * t)).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int = 16000, channels: int = 1) -> bytes:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def audio_part(data: bytes, fmt: str = "wav") -> dict[str, object]:
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": fmt}}


def encode(
    signal: np.ndarray,
    rate: int,
    *,
    container: str,
    codec: str,
    channels: int = 1,
    options: dict[str, str] | None = None,
) -> bytes:
    """Encode a mono float signal (copied to every channel) with PyAV, in memory."""
    layout = LAYOUTS[channels]
    # Packed (interleaved) frames: PyAV cannot build planar frames of more than 7 planes.
    interleaved = np.repeat(signal.astype(np.float32), channels)[None, :]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=rate, options=options or {})
        stream.layout = layout
        step = rate // 10
        for start in range(0, signal.shape[0], step):
            chunk = interleaved[:, start * channels : (start + step) * channels]
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(chunk), format="flt", layout=layout
            )
            frame.rate = rate
            frame.pts = start
            frame.time_base = Fraction(1, rate)
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return buffer.getvalue()

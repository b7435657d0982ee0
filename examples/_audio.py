"""Shared by the examples: settings from the environment and a wav to send.

Not part of the server; each example imports only this helper and its client library.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import sys
import urllib.request
import wave
from pathlib import Path

# A 4 s English sentence shipped beside the examples (see README, "Talking to it").
SAMPLE = Path(__file__).resolve().parent / "speech.mp3"
BASE_URL = os.environ.get("OAS_BASE_URL", "http://127.0.0.1:8000/v1")
API_KEY = os.environ.get("OAS_API_KEY", "not-needed")


def served_model() -> str:
    """OAS_MODEL, else the first model the server lists at /v1/models (the name it was
    started with: a hub id, a directory, or the first --served-model-name)."""
    if os.environ.get("OAS_MODEL"):
        return os.environ["OAS_MODEL"]
    request = urllib.request.Request(
        BASE_URL.rstrip("/") + "/models", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return str(json.load(reply)["data"][0]["id"])


MODEL = served_model()


def tone_wav(seconds: float = 1.5, frequency: float = 440.0, rate: int = 16000) -> bytes:
    """A sine tone as 16-bit mono wav: a second clip that is plainly not speech."""
    frames = b"".join(
        struct.pack("<h", int(12000 * math.sin(2 * math.pi * frequency * i / rate)))
        for i in range(int(seconds * rate))
    )
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(frames)
    return buffer.getvalue()


def audio_from_argv(position: int = 1) -> tuple[bytes, str]:
    """The audio file named on the command line (or OAS_AUDIO), else the shipped sample
    (examples/speech.mp3)."""
    path = sys.argv[position] if len(sys.argv) > position else os.environ.get("OAS_AUDIO")
    path = path or str(SAMPLE)
    with open(path, "rb") as handle:
        return handle.read(), path.rsplit(".", 1)[-1].lower()

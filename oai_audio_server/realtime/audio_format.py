"""Input audio formats of a realtime session: base64 chunks to 16-bit linear PCM.

``audio/pcm`` is 16-bit little-endian mono at 24 kHz (OpenAI's only rate) or 16 kHz
(what this model hears, accepted so that 16 kHz sources need no resampling on the
client). ``audio/pcmu`` and ``audio/pcma`` are G.711 at 8 kHz, expanded here with two
256-entry tables (ITU-T G.711, as FFmpeg's ``pcm_mulaw``/``pcm_alaw`` decoders do), so
the buffer always holds 16-bit samples. Resampling to 16 kHz is not done here: a
committed turn is handed to the same decoder as an uploaded WAV file (see ``wav``).
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass

import numpy as np

from oai_audio_server.errors import InvalidRequestError

PCM_RATES = (24000, 16000)
G711_RATE = 8000


@dataclass(frozen=True)
class InputFormat:
    type: str  # audio/pcm, audio/pcmu or audio/pcma
    rate: int

    @property
    def bytes_per_input_sample(self) -> int:
        return 2 if self.type == "audio/pcm" else 1


def input_format(kind: str, rate: int | None) -> InputFormat:
    """The format a session.update asks for, or the error that says what to send."""
    if kind == "audio/pcm":
        chosen = rate or PCM_RATES[0]
        if chosen not in PCM_RATES:
            raise InvalidRequestError(
                f"audio/pcm at {chosen} Hz is not supported; send 24000 (or 16000) Hz",
                param="session.audio.input.format.rate",
                code="invalid_value",
            )
        return InputFormat(kind, chosen)
    if kind in ("audio/pcmu", "audio/pcma"):
        return InputFormat(kind, G711_RATE)
    raise InvalidRequestError(
        f"the input audio format {kind!r} is not supported; use audio/pcm, audio/pcmu "
        "or audio/pcma",
        param="session.audio.input.format.type",
        code="invalid_value",
    )


def _mulaw_table() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(codes & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = np.where(
        exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << (exponent - 1)
    )
    return np.where(codes & 0x80, magnitude, -magnitude).astype(np.int16)


_TABLES = {"audio/pcmu": _mulaw_table(), "audio/pcma": _alaw_table()}


def decode_chunk(audio: str, fmt: InputFormat, max_bytes: int) -> np.ndarray:
    """One append's base64 audio as int16 samples. ``max_bytes`` bounds the decoded size
    before decoding (the session's room left)."""
    if len(audio) // 4 * 3 > max_bytes + 3:
        raise InvalidRequestError(
            f"the chunk holds about {len(audio) // 4 * 3} bytes of audio, more than the "
            f"{max_bytes} bytes the session's buffer has room for",
            param="audio",
            code="input_audio_buffer_too_large",
        )
    try:
        raw = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(
            "the audio is not valid base64: send the raw sample bytes base64-encoded "
            "(standard alphabet)",
            param="audio",
            code="invalid_base64",
        ) from None
    if fmt.type == "audio/pcm":
        if len(raw) % 2:
            raise InvalidRequestError(
                f"audio/pcm chunks hold whole 16-bit samples; this one has {len(raw)} bytes",
                param="audio",
                code="invalid_audio",
            )
        return np.frombuffer(raw, dtype="<i2").astype(np.int16)
    return _TABLES[fmt.type][np.frombuffer(raw, dtype=np.uint8)]


def wav(samples: np.ndarray, rate: int) -> bytes:
    """16-bit mono PCM in a WAV container: a committed turn as the file a client would
    upload to /v1/audio/transcriptions, so both go through the same decoder."""
    data = samples.astype("<i2").tobytes()
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", 36 + len(data), b"WAVE", b"fmt ", 16, 1, 1, rate, rate * 2, 2, 16,
        b"data", len(data),
    )
    return header + data

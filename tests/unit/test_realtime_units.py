"""The realtime session's pieces without a server: the energy VAD and the input formats."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from oai_audio_server.errors import InvalidRequestError
from oai_audio_server.realtime.audio_format import decode_chunk, input_format, wav
from oai_audio_server.realtime.vad import EnergyVad, SpeechStart, SpeechStop, threshold_level

RATE = 24000


def signal(*parts: tuple[float, float]) -> np.ndarray:
    """(seconds, amplitude) pieces of a 300 Hz tone; amplitude 0 is silence."""
    pieces = []
    for seconds, amplitude in parts:
        t = np.arange(int(seconds * RATE)) / RATE
        pieces.append(amplitude * 32767 * np.sin(2 * np.pi * 300 * t))
    return np.concatenate(pieces).astype(np.int16)


def run(vad: EnergyVad, samples: np.ndarray, chunk: int) -> list[object]:
    events: list[object] = []
    for start in range(0, samples.shape[0], chunk):
        events += vad.push(samples[start : start + chunk])
    return events


@pytest.mark.parametrize("chunk", [1, 239, 2400, 24000 * 5])
def test_vad_times_do_not_depend_on_chunking(chunk: int) -> None:
    samples = signal((1.0, 0.0), (1.5, 0.3), (1.0, 0.0), (0.5, 0.3), (1.0, 0.0))
    events = run(EnergyVad(RATE, 0.5, 300, 500), samples, chunk)
    assert events == [SpeechStart(700), SpeechStop(3000), SpeechStart(3200), SpeechStop(4500)]


def test_vad_ignores_clicks_and_quiet_noise() -> None:
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(RATE * 2) * 32767 * 0.003).astype(np.int16)  # about -50 dBFS
    click = signal((0.5, 0.0), (0.03, 0.9), (1.0, 0.0))
    vad = EnergyVad(RATE, 0.5, 300, 500)
    assert run(vad, noise, 480) == [] and run(vad, click, 480) == []
    # A lower threshold hears the noise as speech.
    assert run(EnergyVad(RATE, 0.1, 300, 500), noise, 480)[:1] == [SpeechStart(0)]


def test_threshold_maps_onto_decibels() -> None:
    assert threshold_level(0.0) == pytest.approx(10 ** (-60 / 20))
    assert threshold_level(0.5) == pytest.approx(10 ** (-35 / 20))
    assert threshold_level(1.0) == pytest.approx(10 ** (-10 / 20))


def test_pcm_chunks_and_their_errors() -> None:
    fmt = input_format("audio/pcm", None)
    assert (fmt.type, fmt.rate) == ("audio/pcm", 24000)
    samples = np.array([0, 1, -1, 32767, -32768], dtype="<i2")
    decoded = decode_chunk(base64.b64encode(samples.tobytes()).decode(), fmt, 1000)
    assert decoded.tolist() == samples.tolist()
    with pytest.raises(InvalidRequestError) as bad:
        decode_chunk("%%%", fmt, 1000)
    assert bad.value.code == "invalid_base64"
    with pytest.raises(InvalidRequestError) as odd:
        decode_chunk(base64.b64encode(b"\x00\x01\x02").decode(), fmt, 1000)
    assert odd.value.code == "invalid_audio"
    with pytest.raises(InvalidRequestError) as big:
        decode_chunk(base64.b64encode(bytes(4000)).decode(), fmt, 1000)
    assert big.value.code == "input_audio_buffer_too_large"
    with pytest.raises(InvalidRequestError) as rate:
        input_format("audio/pcm", 44100)
    assert rate.value.param == "session.audio.input.format.rate"


def test_g711_expands_to_the_standard_values() -> None:
    mulaw, alaw = input_format("audio/pcmu", None), input_format("audio/pcma", None)
    assert mulaw.rate == alaw.rate == 8000
    codes = base64.b64encode(bytes([0x00, 0x7F, 0x80, 0xFF])).decode()
    assert decode_chunk(codes, mulaw, 100).tolist() == [-32124, 0, 32124, 0]
    codes = base64.b64encode(bytes([0x55, 0xD5, 0x00, 0x80])).decode()
    assert decode_chunk(codes, alaw, 100).tolist() == [-8, 8, -5504, 5504]


def test_wav_header_describes_the_samples() -> None:
    data = wav(np.arange(10, dtype=np.int16), 16000)
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt "
    assert int.from_bytes(data[24:28], "little") == 16000
    assert int.from_bytes(data[40:44], "little") == 20 and len(data) == 44 + 20

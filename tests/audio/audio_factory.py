"""Test audio made in memory with PyAV encoders, and the reference mel filters."""

from __future__ import annotations

import io
import struct
from fractions import Fraction

import av
import numpy as np
from media import encode  # noqa: F401  (the tests here import it from this module)


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def chirp(seconds: float, rate: int, f0: float = 200.0, f1: float = 3000.0) -> np.ndarray:
    """A speech-like sweep with a 4 Hz syllable envelope."""
    t = np.arange(int(round(seconds * rate))) / rate
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * max(seconds, 1e-9)))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return (0.3 * envelope * np.sin(phase)).astype(np.float32)


def wav_pcm(signal: np.ndarray, rate: int, codec: str = "pcm_s16le", channels: int = 1) -> bytes:
    return encode(signal, rate, container="wav", codec=codec, channels=channels)


def wav_header(channels: int, rate: int, bits: int = 16, data_bytes: int = 3200) -> bytes:
    """A hand-made PCM WAV with any header values, followed by ``data_bytes`` zeros."""
    block_align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block_align, block_align, bits)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", data_bytes)
        + b"\0" * data_bytes
    )


def silent_opus_bomb(minutes: float) -> bytes:
    """An Ogg Opus file of ``minutes`` of silence, made by repeating one silent packet."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="ogg") as output:
        stream = output.add_stream("libopus", rate=48000, options={"frame_duration": "60"})
        stream.layout = "mono"
        silence = av.AudioFrame.from_ndarray(
            np.zeros((1, 48000), np.float32), format="fltp", layout="mono"
        )
        silence.rate = 48000
        silence.pts = 0
        silence.time_base = Fraction(1, 48000)
        packets = list(stream.encode(silence))
        template = packets[-1]
        payload = bytes(template)
        duration = int(template.duration or 2880)
        pts = int(template.pts or 0)
        for packet in packets:
            output.mux(packet)
        total = int(minutes * 60 * 48000)
        while pts + duration < total:
            pts += duration
            copy = av.Packet(payload)
            copy.stream = stream
            copy.time_base = template.time_base
            copy.pts = pts
            copy.dts = pts
            copy.duration = duration
            output.mux(copy)
    return buffer.getvalue()


def video_bytes(container: str, codec: str, *, with_audio: bool = False) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        video = output.add_stream(codec, rate=10)
        video.width = 64
        video.height = 64
        video.pix_fmt = "yuv420p"
        audio = None
        if with_audio:
            audio = output.add_stream("aac" if container == "mp4" else "libopus", rate=48000)
            audio.layout = "mono"
        for index in range(10):
            image = np.full((64, 64, 3), index * 20, np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            frame.time_base = Fraction(1, 10)
            for packet in video.encode(frame):
                output.mux(packet)
        for packet in video.encode(None):
            output.mux(packet)
        if audio is not None:
            samples = tone(440, 1.0, 48000)[None, :]
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.rate = 48000
            frame.pts = 0
            frame.time_base = Fraction(1, 48000)
            for packet in audio.encode(frame):
                output.mux(packet)
            for packet in audio.encode(None):
                output.mux(packet)
    return buffer.getvalue()


def dominant_frequency(samples: np.ndarray, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.shape[0])))
    return float(np.fft.rfftfreq(samples.shape[0], 1 / rate)[int(np.argmax(spectrum))])


def slaney_mel_filters(rate: int = 16000, n_fft: int = 400, n_mels: int = 80) -> np.ndarray:
    """Slaney-style mel filterbank (as Whisper's mel_filters.npz), written for the tests."""
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0

    def hz_to_mel(hz: np.ndarray) -> np.ndarray:
        hz = np.asarray(hz, dtype=np.float64)
        log_part = min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep
        return np.where(hz >= min_log_hz, log_part, hz / f_sp)

    def mel_to_hz(mel: np.ndarray) -> np.ndarray:
        log_part = min_log_hz * np.exp(logstep * (mel - min_log_mel))
        return np.where(mel >= min_log_mel, log_part, f_sp * mel)

    fft_freqs = np.linspace(0, rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(
        np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(rate / 2)), n_mels + 2)
    )
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[:, None]
    return weights.astype(np.float32)


def reference_log_mel(samples: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """Whisper's log-mel in float64 numpy: an independent check of the torch version."""
    padded = np.zeros(480000, np.float64)
    padded[: samples.shape[0]] = samples
    signal = np.pad(padded, 200, mode="reflect")
    starts = np.arange(0, signal.shape[0] - 400 + 1, 160)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    frames = signal[starts[:, None] + np.arange(400)[None, :]] * window
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # [3001, 201]
    mel = filters.astype(np.float64) @ power[:-1].T
    log_mel = np.log10(np.maximum(mel, 1e-10))
    log_mel = np.maximum(log_mel, log_mel.max() - 8.0)
    return (log_mel + 4.0) / 4.0

"""Decode audio bytes in memory with PyAV to 16 kHz mono float32.

The samples equal what the official Qwen-Audio loader gets from
``ffmpeg -i X -ac 1 -ar 16000 -f s16le -``: FFmpeg's resampler to signed 16-bit mono
at 16 kHz, divided by 32768. The container is sniffed from the bytes; a format hint is
used only when probing fails. Limits are enforced while decoding, so a small file that
expands to hours of audio (a decompression bomb) stops at the limit.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import av
import av.container
import numpy as np

from oai_audio_server.errors import InvalidAudioError
from oai_audio_server.settings import limit_name

SAMPLE_RATE = 16000
MIN_SOURCE_RATE = 1_000
MAX_SOURCE_RATE = 384_000
MAX_CHANNELS = 32
# Undecodable packets tolerated in a row before the stream counts as corrupt.
_MAX_BAD_PACKETS_IN_A_ROW = 64

# Demuxers FFmpeg may pick while probing. Anything else (playlists such as HLS that
# open further URLs, image sequences, subtitles, raw guesses) is refused before it runs.
ALLOWED_DEMUXERS: tuple[str, ...] = (
    "wav",
    "w64",
    "aiff",
    "caf",
    "au",
    "mp3",
    "flac",
    "ogg",
    "matroska",
    "webm",
    "mov",
    "mp4",
    "m4a",
    "aac",
    "amr",
    "amrnb",
    "amrwb",
    "wv",
    "ape",
    "asf",
    "avi",
    "flv",
    "mpegts",
)

# A client's format name (file extension or OpenAI input_audio format) -> FFmpeg demuxer.
_HINT_TO_DEMUXER: dict[str, str] = {
    "wav": "wav",
    "wave": "wav",
    "mp3": "mp3",
    "mpeg": "mp3",
    "flac": "flac",
    "ogg": "ogg",
    "oga": "ogg",
    "opus": "ogg",
    "webm": "matroska",
    "mkv": "matroska",
    "mka": "matroska",
    "m4a": "mov",
    "mp4": "mov",
    "aac": "aac",
    "aiff": "aiff",
    "aif": "aiff",
    "caf": "caf",
    "au": "au",
    "amr": "amr",
    "wma": "asf",
}

_FIX_FORMATS = "Send WAV, MP3, FLAC, OGG (Vorbis/Opus), WebM (Opus) or M4A (AAC) audio."


class MemoryReader(io.RawIOBase):
    """A seekable file over a memoryview, without copying it: ``io.BytesIO`` copies
    anything but ``bytes`` whole, in one call that holds the GIL."""

    def __init__(self, data: memoryview) -> None:
        super().__init__()
        self._view = data.cast("B") if data.format != "B" else data
        self._at = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        count = max(0, min(len(target), len(self._view) - self._at))
        target[:count] = self._view[self._at : self._at + count]
        self._at += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: len(self._view)}[whence]
        self._at = max(0, base + offset)
        return self._at

    def tell(self) -> int:
        return self._at


def _source(data: bytes | memoryview) -> io.IOBase:
    return io.BytesIO(data) if isinstance(data, bytes) else MemoryReader(data)


def decode_audio(
    data: bytes | memoryview, *, format_hint: str | None, max_seconds: float
) -> np.ndarray:
    """Decode ``data`` to float32 samples at 16 kHz, mono, in [-1, 1).

    Raises :class:`InvalidAudioError` saying what to fix when the bytes are not
    decodable audio or the audio is longer than ``max_seconds``.
    """
    if not data:
        raise InvalidAudioError("The audio is empty (0 bytes). " + _FIX_FORMATS)
    max_samples = int(max_seconds * SAMPLE_RATE)
    container = _open_container(data, format_hint)
    try:
        pcm = _decode_first_audio_stream(container, max_seconds, max_samples)
    finally:
        container.close()
    return pcm.astype(np.float32) / np.float32(32768.0)


def _open_container(
    data: bytes | memoryview, format_hint: str | None
) -> av.container.InputContainer:
    options = {"format_whitelist": ",".join(ALLOWED_DEMUXERS)}
    try:
        return av.open(_source(data), mode="r", options=options, metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError, EOFError) as probe_error:
        fallback = _HINT_TO_DEMUXER.get((format_hint or "").strip().lower().lstrip("."))
        if fallback is not None:
            try:
                return av.open(
                    _source(data),
                    mode="r",
                    format=fallback,
                    options=options,
                    metadata_errors="ignore",
                )
            except (av.FFmpegError, ValueError, OSError, EOFError):
                pass
        raise InvalidAudioError(
            "The audio could not be read: the bytes are not a supported audio container "
            f"or are corrupt ({len(data)} bytes). " + _FIX_FORMATS
        ) from probe_error


def _decode_first_audio_stream(
    container: av.container.InputContainer, max_seconds: float, max_samples: int
) -> np.ndarray:
    if not container.streams.audio:
        kinds = sorted({stream.type for stream in container.streams})
        found = f" (it holds only {', '.join(kinds)} streams)" if kinds else ""
        raise InvalidAudioError(
            f"The file has no audio stream{found}. Send a file with an audio track."
        )
    stream = container.streams.audio[0]
    codec_context = stream.codec_context
    if codec_context is None:
        raise InvalidAudioError("The audio codec is not supported. " + _FIX_FORMATS)
    # Zero means "not known before decoding"; frames are checked again below.
    if codec_context.sample_rate:
        _check_rate_and_channels(codec_context.sample_rate, codec_context.channels)

    chunks: list[np.ndarray] = []
    total = 0
    for chunk in _resampled_chunks(container, stream):
        total += chunk.shape[0]
        if total > max_samples:
            raise InvalidAudioError(
                f"The audio is longer than this server's limit of {max_seconds:g} s per "
                f"request ({limit_name('max_audio_seconds')}). Send a shorter part of it, or "
                "split it over several requests."
            )
        chunks.append(chunk)
    if total == 0:
        raise InvalidAudioError(
            "The audio has no decodable samples: the file is empty, truncated or corrupt. "
            "Send a complete audio file."
        )
    return np.concatenate(chunks)


def _resampled_chunks(
    container: av.container.InputContainer, stream: av.AudioStream
) -> Iterator[np.ndarray]:
    """Yield int16 mono 16 kHz chunks, one per decoded frame, as they are decoded."""
    resampler: av.AudioResampler | None = None
    source_shape: tuple[str, str, int] | None = None
    bad_in_a_row = 0
    for frame in _decoded_frames(container, stream):
        _check_rate_and_channels(frame.sample_rate, frame.layout.nb_channels)
        shape = (frame.format.name, frame.layout.name, frame.sample_rate)
        if resampler is None or shape != source_shape:
            # A stream may change rate or layout midway; a resampler serves one input shape.
            if resampler is not None:
                yield from _to_arrays(resampler.resample(None))
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            source_shape = shape
        try:
            resampled = resampler.resample(frame)
        except (av.FFmpegError, ValueError):
            bad_in_a_row += 1
            if bad_in_a_row > _MAX_BAD_PACKETS_IN_A_ROW:
                break
            continue
        bad_in_a_row = 0
        yield from _to_arrays(resampled)
    if resampler is not None:
        yield from _to_arrays(resampler.resample(None))


def _decoded_frames(
    container: av.container.InputContainer, stream: av.AudioStream
) -> Iterator[av.AudioFrame]:
    bad_in_a_row = 0
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError as error:
                # Like the ffmpeg CLI, skip damaged packets; many in a row mean garbage.
                bad_in_a_row += 1
                if bad_in_a_row > _MAX_BAD_PACKETS_IN_A_ROW:
                    raise InvalidAudioError(
                        "The audio stream is corrupt: its packets cannot be decoded. "
                        "Send a complete, valid audio file."
                    ) from error
                continue
            bad_in_a_row = 0
            for frame in frames:
                if isinstance(frame, av.AudioFrame):
                    yield frame
    except av.FFmpegError:
        # A read error mid-file (truncated upload): keep what was decoded so far, as the
        # ffmpeg CLI does. No samples at all is reported by the caller.
        return


def _to_arrays(frames: list[av.AudioFrame]) -> Iterator[np.ndarray]:
    for frame in frames:
        if frame.samples:
            yield frame.to_ndarray().reshape(-1).astype(np.int16, copy=False)


def _check_rate_and_channels(sample_rate: int, channels: int) -> None:
    if not MIN_SOURCE_RATE <= sample_rate <= MAX_SOURCE_RATE:
        raise InvalidAudioError(
            f"The audio's sample rate {sample_rate} Hz is outside the supported range "
            f"{MIN_SOURCE_RATE}-{MAX_SOURCE_RATE} Hz. Resample it to a common rate "
            "such as 16000 or 48000 Hz."
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise InvalidAudioError(
            f"The audio has {channels} channels; 1 to {MAX_CHANNELS} are supported. "
            "Downmix it to mono or stereo."
        )

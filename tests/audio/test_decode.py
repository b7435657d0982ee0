from __future__ import annotations

import tracemalloc

import av
import numpy as np
import pytest
from audio_factory import (
    chirp,
    dominant_frequency,
    encode,
    silent_opus_bomb,
    tone,
    video_bytes,
    wav_header,
    wav_pcm,
)

from oai_audio_server.audio import SAMPLE_RATE, decode_audio
from oai_audio_server.errors import InvalidAudioError


def _require_encoder(name: str) -> None:
    try:
        av.Codec(name, "w")
    except Exception:  # noqa: BLE001 - any failure means the wheel lacks it
        pytest.skip(f"this PyAV build has no {name} encoder")


# (id, container, codec, rate, channels, encoder options, duration tolerance in s)
FORMATS = [
    ("wav-s16-16k-mono", "wav", "pcm_s16le", 16000, 1, None, 0.001),
    ("wav-s24-44k-stereo", "wav", "pcm_s24le", 44100, 2, None, 0.001),
    ("wav-s32-48k-stereo", "wav", "pcm_s32le", 48000, 2, None, 0.001),
    ("wav-f32-96k-mono", "wav", "pcm_f32le", 96000, 1, None, 0.001),
    ("wav-u8-8k-mono", "wav", "pcm_u8", 8000, 1, None, 0.001),
    ("wav-s16-22k-6ch", "wav", "pcm_s16le", 22050, 6, None, 0.001),
    ("wav-s16-32k-8ch", "wav", "pcm_s16le", 32000, 8, None, 0.001),
    ("mp3-44k-stereo", "mp3", "libmp3lame", 44100, 2, None, 0.06),
    ("mp3-8k-mono", "mp3", "libmp3lame", 8000, 1, None, 0.2),
    ("flac-48k-stereo", "flac", "flac", 48000, 2, None, 0.001),
    ("flac-8k-mono", "flac", "flac", 8000, 1, None, 0.001),
    ("ogg-vorbis-44k-stereo", "ogg", "vorbis", 44100, 2, {"strict": "experimental"}, 0.03),
    ("ogg-opus-48k-mono", "ogg", "libopus", 48000, 1, None, 0.03),
    ("webm-opus-48k-stereo", "webm", "libopus", 48000, 2, None, 0.03),
    ("m4a-aac-44k-stereo", "ipod", "aac", 44100, 2, None, 0.06),
    ("m4a-aac-48k-6ch", "ipod", "aac", 48000, 6, None, 0.06),
]


@pytest.mark.parametrize(
    ("container", "codec", "rate", "channels", "options", "tolerance"),
    [case[1:] for case in FORMATS],
    ids=[case[0] for case in FORMATS],
)
def test_formats_decode_to_16k_mono_keeping_duration_and_pitch(
    container: str,
    codec: str,
    rate: int,
    channels: int,
    options: dict[str, str] | None,
    tolerance: float,
) -> None:
    _require_encoder(codec)
    frequency = 440.0 if rate >= 16000 else 300.0
    data = encode(
        tone(frequency, 2.0, rate),
        rate,
        container=container,
        codec=codec,
        channels=channels,
        options=options,
    )
    samples = decode_audio(data, format_hint=None, max_seconds=60)
    assert samples.dtype == np.float32
    assert samples.ndim == 1
    assert abs(samples.shape[0] / SAMPLE_RATE - 2.0) <= tolerance
    middle = samples[SAMPLE_RATE // 2 : SAMPLE_RATE + SAMPLE_RATE // 2]
    assert abs(dominant_frequency(middle) - frequency) <= 2.0
    assert 0.15 < float(np.max(np.abs(middle))) < 0.45  # a 0.3 tone, same in every channel
    # The same bytes as a view of anonymous memory (how base64 from a large body arrives).
    view = np.array(memoryview(data), dtype=np.uint8).data
    assert np.array_equal(decode_audio(view, format_hint=None, max_seconds=60), samples)


def test_16k_mono_s16_wav_is_bit_exact_like_the_official_loader() -> None:
    rng = np.random.default_rng(0)
    pcm = rng.integers(-32768, 32767, 16000, dtype=np.int16)
    data = wav_pcm(pcm.astype(np.float32) / 32768.0, 16000)
    samples = decode_audio(data, format_hint="wav", max_seconds=10)
    np.testing.assert_array_equal(samples, pcm.astype(np.float32) / 32768.0)


@pytest.mark.parametrize("hint", ["mp3", "wav", "m4a", "nonsense", None])
def test_wrong_format_hint_still_decodes(hint: str | None) -> None:
    data = encode(chirp(1.0, 48000), 48000, container="flac", codec="flac")
    samples = decode_audio(data, format_hint=hint, max_seconds=10)
    assert abs(samples.shape[0] - SAMPLE_RATE) <= 1


def test_video_with_an_audio_track_decodes_its_audio() -> None:
    samples = decode_audio(
        video_bytes("mp4", "mpeg4", with_audio=True), format_hint=None, max_seconds=10
    )
    assert abs(samples.shape[0] / SAMPLE_RATE - 1.0) < 0.1
    assert abs(dominant_frequency(samples[4000:12000]) - 440) <= 4


def _assert_invalid(data: bytes, fragment: str, max_seconds: float = 60.0) -> InvalidAudioError:
    with pytest.raises(InvalidAudioError) as caught:
        decode_audio(data, format_hint="wav", max_seconds=max_seconds)
    assert fragment in caught.value.message
    assert caught.value.status_code == 400
    assert caught.value.param is None
    return caught.value


def test_empty_bytes() -> None:
    _assert_invalid(b"", "empty")


def test_random_bytes() -> None:
    _assert_invalid(np.random.default_rng(1).bytes(4096), "not a supported audio container")


def test_text() -> None:
    _assert_invalid(b"hello, this is not audio at all\n" * 20, "not a supported audio container")


def test_hls_playlist_is_refused_before_it_opens_anything() -> None:
    playlist = (
        b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
    )
    _assert_invalid(playlist, "not a supported audio container")


@pytest.mark.parametrize(
    ("container", "codec"), [("mp3", "libmp3lame"), ("flac", "flac"), ("ogg", "libopus")]
)
def test_truncated_file_without_samples(container: str, codec: str) -> None:
    data = encode(tone(440, 2.0, 48000), 48000, container=container, codec=codec)
    with pytest.raises(InvalidAudioError):
        decode_audio(data[:60], format_hint=None, max_seconds=60)


def test_truncated_file_keeps_the_decodable_part() -> None:
    data = encode(tone(440, 4.0, 44100), 44100, container="mp3", codec="libmp3lame")
    samples = decode_audio(data[: len(data) // 2], format_hint=None, max_seconds=60)
    assert 1.0 < samples.shape[0] / SAMPLE_RATE < 3.0


def test_wav_header_with_zero_samples() -> None:
    _assert_invalid(wav_header(1, 16000, data_bytes=0), "no decodable samples")


def test_video_only_mp4() -> None:
    _assert_invalid(video_bytes("mp4", "mpeg4"), "no audio stream")


def test_video_only_webm() -> None:
    _assert_invalid(video_bytes("webm", "libvpx"), "no audio stream")


@pytest.mark.parametrize(
    ("channels", "rate", "fragment"),
    [
        (64, 16000, "64 channels"),
        (1, 500_000, "500000 Hz"),
        (1, 500, "500 Hz"),
        (0, 16000, "0 channels"),
    ],
)
def test_absurd_wav_headers(channels: int, rate: int, fragment: str) -> None:
    _assert_invalid(wav_header(channels, rate), fragment)


def test_too_long() -> None:
    data = wav_pcm(tone(440, 3.0, 16000), 16000)
    error = _assert_invalid(data, "longer than this server's limit of 2 s", max_seconds=2.0)
    assert "--max-audio-seconds / OAS_MAX_AUDIO_SECONDS" in error.message


@pytest.mark.parametrize("kind", ["flac", "opus"])
def test_decompression_bomb_stops_at_the_limit(kind: str) -> None:
    """40 minutes of silence with a 60 s limit fails without materialising 40 minutes."""
    if kind == "flac":
        bomb = encode(np.zeros(8000 * 60 * 40, np.float32), 8000, container="flac", codec="flac")
    else:
        bomb = silent_opus_bomb(40)
    assert len(bomb) < 1_000_000
    tracemalloc.start()
    try:
        _assert_invalid(bomb, "longer than this server's limit of 60 s", max_seconds=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    forty_minutes_float32 = 40 * 60 * SAMPLE_RATE * 4
    assert peak < forty_minutes_float32 / 20  # 60 s of int16 chunks is ~1.9 MB

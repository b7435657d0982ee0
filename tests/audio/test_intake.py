from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import threading
from typing import Any

import numpy as np
import pytest
from audio_factory import chirp, encode, tone, wav_pcm

from oai_audio_server.audio import AudioIntake, MelFeatureExtractor, PreparedAudio
from oai_audio_server.audio import intake as intake_module
from oai_audio_server.errors import InvalidAudioError, InvalidRequestError
from oai_audio_server.settings import Settings

FLAC = encode(chirp(3.0, 48000), 48000, container="flac", codec="flac", channels=2)


def _intake(extractor: MelFeatureExtractor, **changes: Any) -> AudioIntake:
    return AudioIntake(Settings().replace(**changes), extractor)


def test_from_bytes_prepares_one_segment(extractor: MelFeatureExtractor) -> None:
    prepared = asyncio.run(_intake(extractor).from_bytes(FLAC, "flac"))
    assert isinstance(prepared, PreparedAudio)
    assert prepared.digest == hashlib.sha256(FLAC).hexdigest()
    assert prepared.duration_seconds == pytest.approx(3.0, abs=1e-3)
    assert len(prepared.segments) == 1
    segment = prepared.segments[0]
    assert segment.mel.shape == (80, 3000)
    assert segment.token_count == 75
    assert (segment.start_seconds, segment.end_seconds) == (0.0, pytest.approx(3.0, abs=1e-3))


def test_second_load_of_the_same_bytes_does_zero_decodes(extractor: MelFeatureExtractor) -> None:
    intake = _intake(extractor)

    async def twice() -> tuple[PreparedAudio, PreparedAudio]:
        first = await intake.from_bytes(FLAC, None)
        second = await intake.from_base64(base64.b64encode(FLAC).decode(), "mp3")
        return first, second

    first, second = asyncio.run(twice())
    assert second is first
    stats = intake.stats
    assert stats.decodes == 1
    assert stats.cache_hits == 1
    assert stats.cache_misses == 1


def test_cache_survives_across_event_loops(extractor: MelFeatureExtractor) -> None:
    intake = _intake(extractor)
    asyncio.run(intake.from_bytes(FLAC, None))
    asyncio.run(intake.from_bytes(FLAC, None))
    assert intake.stats.decodes == 1


def test_cache_disabled_decodes_every_time(extractor: MelFeatureExtractor) -> None:
    intake = _intake(extractor, audio_cache_mb=0)
    asyncio.run(intake.from_bytes(FLAC, None))
    asyncio.run(intake.from_bytes(FLAC, None))
    assert intake.stats.decodes == 2


def test_concurrent_requests_for_the_same_bytes_share_one_decode(
    extractor: MelFeatureExtractor,
) -> None:
    intake = _intake(extractor, audio_cache_mb=0)

    async def together() -> list[PreparedAudio]:
        return list(await asyncio.gather(*(intake.from_bytes(FLAC, None) for _ in range(4))))

    results = asyncio.run(together())
    assert all(result is results[0] for result in results)
    assert intake.stats.decodes == 1
    assert intake.stats.shared_decodes == 3


def test_shared_errors_are_separate_objects(extractor: MelFeatureExtractor) -> None:
    intake = _intake(extractor)

    async def together() -> list[BaseException | PreparedAudio]:
        calls = (intake.from_bytes(b"not audio" * 100, None) for _ in range(2))
        return list(await asyncio.gather(*calls, return_exceptions=True))

    first, second = asyncio.run(together())
    assert isinstance(first, InvalidAudioError)
    assert isinstance(second, InvalidAudioError)
    assert first is not second
    first.with_param("messages[0].content[0]")
    assert second.param is None


def test_long_audio_is_split_into_segments(extractor: MelFeatureExtractor) -> None:
    data = wav_pcm(chirp(65.0, 16000), 16000)
    prepared = asyncio.run(_intake(extractor).from_bytes(data, "wav"))
    assert len(prepared.segments) == 3
    assert prepared.duration_seconds == pytest.approx(65.0)
    assert prepared.segments[0].start_seconds == 0.0
    for before, after in zip(prepared.segments, prepared.segments[1:], strict=False):
        assert before.end_seconds == pytest.approx(after.start_seconds)
        assert 29.0 < before.end_seconds - before.start_seconds <= 30.0
    assert prepared.segments[-1].end_seconds == pytest.approx(65.0)


def test_decoding_runs_off_the_event_loop(
    extractor: MelFeatureExtractor, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    real_decode = intake_module.decode_audio

    def recording_decode(data: bytes, **kwargs: Any) -> np.ndarray:
        threads.append(threading.get_ident())
        return real_decode(data, **kwargs)

    monkeypatch.setattr(intake_module, "decode_audio", recording_decode)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="decode") as executor:
        intake = AudioIntake(Settings(), extractor, executor)

        async def run() -> int:
            await intake.from_bytes(FLAC, None)
            return threading.get_ident()

        loop_thread = asyncio.run(run())
    assert threads and threads[0] != loop_thread


def test_duration_limit_comes_from_settings(extractor: MelFeatureExtractor) -> None:
    with pytest.raises(InvalidAudioError) as caught:
        asyncio.run(_intake(extractor, max_audio_seconds=2.0).from_bytes(FLAC, None))
    assert "2 s" in caught.value.message
    assert caught.value.param is None


def test_byte_limit(extractor: MelFeatureExtractor) -> None:
    with pytest.raises(InvalidAudioError) as caught:
        asyncio.run(_intake(extractor, max_audio_bytes=1000).from_bytes(FLAC, None))
    assert caught.value.status_code == 400
    assert "--max-audio-bytes" in caught.value.message
    with pytest.raises(InvalidAudioError):
        encoded = base64.b64encode(FLAC).decode()
        asyncio.run(_intake(extractor, max_audio_bytes=1000).from_base64(encoded, None))


def test_too_short_audio(extractor: MelFeatureExtractor) -> None:
    data = wav_pcm(tone(440, 0.01, 16000), 16000)
    with pytest.raises(InvalidAudioError) as caught:
        asyncio.run(_intake(extractor).from_bytes(data, None))
    assert "too short" in caught.value.message


@pytest.mark.parametrize("text", ["not base64!!", "QUJD$", "   "])
def test_invalid_base64(extractor: MelFeatureExtractor, text: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        asyncio.run(_intake(extractor).from_base64(text, "wav"))
    assert caught.value.code == "invalid_base64"
    assert not isinstance(caught.value, InvalidAudioError)


def test_base64_with_line_breaks_and_data_uri(extractor: MelFeatureExtractor) -> None:
    encoded = base64.encodebytes(FLAC).decode()  # 76-character lines
    intake = _intake(extractor)
    asyncio.run(intake.from_base64(encoded, "flac"))
    uri = "data:audio/flac;base64," + base64.b64encode(FLAC).decode()
    asyncio.run(intake.from_base64(uri, None))
    asyncio.run(intake.from_url(uri))
    assert intake.stats.decodes == 1


def test_from_url_refuses_what_settings_refuse(extractor: MelFeatureExtractor) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        asyncio.run(_intake(extractor).from_url("http://example.com/a.wav"))
    assert caught.value.code == "media_url_not_allowed"

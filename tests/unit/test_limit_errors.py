"""Every limit error names the flag and the environment variable that set the limit,
states the limit once (readably, not as 26214400), and says what to send instead."""

from __future__ import annotations

import re

import pytest

from oai_audio_server.audio.payload import too_large
from oai_audio_server.audio.types import PreparedAudio
from oai_audio_server.chat.messages import AudioBudget
from oai_audio_server.errors import APIError
from oai_audio_server.settings import MIB

SEND_INSTEAD = re.compile(r"\b(send|split|leave it out)\b", re.IGNORECASE)


def check(error: APIError, flag: str, limit: str) -> str:
    message = error.message
    assert f"--{flag} / OAS_{flag.replace('-', '_').upper()}" in message, message
    assert message.count(limit) == 1, message
    assert SEND_INSTEAD.search(message), message
    return message


@pytest.mark.parametrize("size", [None, 30_000_000])
def test_audio_over_the_size_limit(size: int | None) -> None:
    message = check(too_large(size, 25 * MIB), "max-audio-bytes", "25 MiB")
    assert str(25 * MIB) not in message
    assert ("30000000 bytes" in message) == (size is not None)


def audio(seconds: float) -> PreparedAudio:
    return PreparedAudio(digest="0" * 64, duration_seconds=seconds, segments=())


def test_too_many_audio_items() -> None:
    budget = AudioBudget(max_items=2, max_seconds=600)
    budget.charge(audio(1), "messages[0]")
    budget.charge(audio(1), "messages[0]")
    with pytest.raises(APIError) as caught:
        budget.charge(audio(1), "messages[0]")
    check(caught.value, "max-audios-per-request", "at most 2")


def test_too_much_audio_in_one_request() -> None:
    budget = AudioBudget(max_items=16, max_seconds=600)
    budget.charge(audio(400), "messages[0]")
    with pytest.raises(APIError) as caught:
        budget.charge(audio(300), "messages[1]")
    message = check(caught.value, "max-audio-seconds", "600 s")
    assert "700.0 s" in message


def test_a_long_audio_file_is_refused_while_decoding() -> None:
    from media import tone, wav_bytes

    from oai_audio_server.audio.decode import decode_audio
    from oai_audio_server.errors import InvalidAudioError

    with pytest.raises(InvalidAudioError) as caught:
        decode_audio(wav_bytes(tone(3.0, 440.0)), format_hint="wav", max_seconds=2.0)
    check(caught.value, "max-audio-seconds", "2 s")

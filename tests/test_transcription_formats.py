"""Response format renderers, the request options and the per-task prompts (no server)."""

from __future__ import annotations

import json

import pytest

from oai_audio_server.errors import InvalidRequestError
from oai_audio_server.http.transcription_routes import format_hint
from oai_audio_server.transcription.formats import (
    TimedSegment,
    TranscriptResult,
    compression_ratio,
    render,
)
from oai_audio_server.transcription.prompts import instruction
from oai_audio_server.transcription.protocol import TranscriptionOptions
from oai_audio_server.transcription.service import join_segment_texts

RESULT = TranscriptResult(
    task="transcribe",
    language="english",
    duration=3725.5,
    text="Hello there. General Kenobi.",
    segments=(
        TimedSegment(0.0, 1.2, "Hello there.", (1, 2, 3), 0),
        TimedSegment(1.25, 2.0, "", (), 0),
        TimedSegment(3723.0, 3725.5004, "General Kenobi.", (4,), 372300),
    ),
    temperature=0.0,
)


def test_json() -> None:
    body = render(RESULT, "json")
    assert body.media_type == "application/json"
    assert json.loads(body.content) == {
        "text": "Hello there. General Kenobi.",
        "usage": {"type": "duration", "seconds": 3726.0},
    }


def test_text() -> None:
    body = render(RESULT, "text")
    assert body.media_type.startswith("text/plain")
    assert body.content.decode() == "Hello there. General Kenobi.\n"


def test_verbose_json() -> None:
    reply = json.loads(render(RESULT, "verbose_json").content)
    assert reply["task"] == "transcribe" and reply["language"] == "english"
    assert reply["duration"] == 3725.5 and reply["text"] == RESULT.text
    assert reply["usage"] == {"type": "duration", "seconds": 3726.0}
    keys = {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
            "compression_ratio", "no_speech_prob"}
    assert [set(s) for s in reply["segments"]] == [keys] * 3
    assert [s["id"] for s in reply["segments"]] == [0, 1, 2]
    assert reply["segments"][2]["end"] == 3725.5
    assert reply["segments"][2]["seek"] == 372300
    assert reply["segments"][0]["tokens"] == [1, 2, 3]


def test_srt_numbers_cues_and_skips_empty_ones() -> None:
    body = render(RESULT, "srt")
    assert body.media_type.startswith("text/plain")
    assert body.content.decode() == (
        "1\n00:00:00,000 --> 00:00:01,200\nHello there.\n\n"
        "2\n01:02:03,000 --> 01:02:05,500\nGeneral Kenobi.\n"
    )


def test_vtt() -> None:
    body = render(RESULT, "vtt")
    assert body.media_type.startswith("text/vtt")
    assert body.content.decode() == (
        "WEBVTT\n\n"
        "00:00:00.000 --> 00:00:01.200\nHello there.\n\n"
        "01:02:03.000 --> 01:02:05.500\nGeneral Kenobi.\n"
    )


def test_cue_text_cannot_break_the_cue() -> None:
    result = TranscriptResult(
        "transcribe", "english", 2.0, "a", (TimedSegment(0.0, 2.0, "a\n\n--> b"),)
    )
    assert render(result, "srt").content.decode() == "1\n00:00:00,000 --> 00:00:02,000\na\n-> b\n"
    assert render(result, "vtt").content.decode().endswith("\na\n-> b\n")


def test_compression_ratio() -> None:
    assert compression_ratio("") == 0.0
    assert compression_ratio("ha" * 200) > 2.4


def test_join_segment_texts() -> None:
    assert join_segment_texts(["a.", "", "b"]) == "a. b"
    assert join_segment_texts(["你好", "世界"]) == "你好世界"
    assert join_segment_texts(["", ""]) == ""


def test_options_defaults_and_validation() -> None:
    options = TranscriptionOptions.from_fields("transcribe", model="whisper-1")
    assert (options.response_format, options.temperature, options.stream) == ("json", 0.0, False)
    regional = TranscriptionOptions.from_fields("transcribe", model="m", language="en-US")
    assert regional.language == "en"
    assert TranscriptionOptions.from_fields("translate", model="m", language="de").language is None
    assert TranscriptionOptions.from_fields("transcribe", model="m", stream="true").stream
    cases = [
        ({"model": "m", "response_format": "xml"}, "response_format"),
        ({"model": "m", "temperature": "hot"}, "temperature"),
        ({"model": "m", "temperature": "1.5"}, "temperature"),
        ({"model": "m", "language": "english!"}, "language"),
        ({"model": "m", "stream": "maybe"}, "stream"),
        ({"model": "m", "timestamp_granularities": ["char"]}, "timestamp_granularities"),
        ({"model": ""}, "model"),
    ]
    for fields, param in cases:
        with pytest.raises(InvalidRequestError) as caught:
            TranscriptionOptions.from_fields("transcribe", **fields)  # type: ignore[arg-type]
        assert caught.value.param == param and caught.value.status == 400


def test_instructions_per_task() -> None:
    plain = instruction("transcribe", language=None, context=None)
    assert plain.startswith("what does the person say?")
    hinted = instruction("transcribe", language="de", context="Earlier  words\nhere")
    assert "German" in hinted and "Earlier words here" in hinted
    translated = instruction("translate", language="de", context=None)
    assert "English" in translated and "German" not in translated


@pytest.mark.parametrize(
    ("filename", "content_type", "hint"),
    [
        ("0f6c.webm", "application/octet-stream", "webm"),
        ("../../etc/passwd", "audio/mpeg", "mp3"),
        ("C:\\x\\a.WAV", None, "wav"),
        ("noext", "audio/ogg; codecs=opus", "ogg"),
        ("a.we/bm", None, None),
        (None, None, None),
    ],
)
def test_format_hint_uses_only_the_extension(
    filename: str | None, content_type: str | None, hint: str | None
) -> None:
    assert format_hint(filename, content_type) == hint

"""A finished transcript rendered in each of OpenAI's response formats.

``json`` and ``verbose_json`` are JSON objects; ``text``, ``srt`` and ``vtt`` are raw
bodies (text/plain, text/plain and text/vtt). Subtitles skip segments without text, so
every cue has a line to show; their numbering stays consecutive.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

from msgspec import UNSET

from oai_audio_server.protocol import json_encoder
from oai_audio_server.transcription.prompts import Task
from oai_audio_server.transcription.protocol import (
    ResponseFormat,
    Transcription,
    TranscriptionSegment,
    TranscriptionVerbose,
    TranscriptLogprob,
    UsageDuration,
)


@dataclass(frozen=True)
class TimedSegment:
    """A piece of the transcript with absolute times in seconds."""

    start: float
    end: float
    text: str
    tokens: tuple[int, ...] = ()
    seek: int = 0  # start of its 30 s audio window, in 10 ms frames (as Whisper counts)
    avg_logprob: float = 0.0  # see transcription/confidence.py
    no_speech_prob: float = 0.0


@dataclass(frozen=True)
class TranscriptResult:
    task: Task
    language: str
    duration: float
    text: str
    segments: tuple[TimedSegment, ...]
    temperature: float = 0.0
    logprobs: tuple[TranscriptLogprob, ...] | None = None  # include[]=logprobs


@dataclass(frozen=True)
class RenderedBody:
    content: bytes
    media_type: str


def usage_of(result: TranscriptResult) -> UsageDuration:
    """OpenAI bills (and reports) whole seconds of input audio."""
    return UsageDuration(seconds=float(math.ceil(result.duration)))


def compression_ratio(text: str) -> float:
    """Whisper's repetition check: text bytes over their zlib-compressed size."""
    data = text.encode("utf-8")
    if not data:
        return 0.0
    return round(len(data) / len(zlib.compress(data)), 4)


def _seconds(value: float) -> float:
    return round(value, 3)


def verbose_json(result: TranscriptResult) -> TranscriptionVerbose:
    return TranscriptionVerbose(
        task=result.task,
        language=result.language,
        duration=_seconds(result.duration),
        text=result.text,
        segments=[
            TranscriptionSegment(
                id=index,
                seek=segment.seek,
                start=_seconds(segment.start),
                end=_seconds(segment.end),
                text=segment.text,
                tokens=list(segment.tokens),
                temperature=result.temperature,
                avg_logprob=segment.avg_logprob,
                compression_ratio=compression_ratio(segment.text),
                no_speech_prob=segment.no_speech_prob,
            )
            for index, segment in enumerate(result.segments)
        ],
        usage=usage_of(result),
    )


# A segment the model timed as an instant (start == end) still needs a cue players show:
# it lasts this long, or until the next cue starts, and at least 1 ms.
MIN_CUE_MS = 200


def _millis(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def cue_spans(segments: list[TimedSegment]) -> list[tuple[int, int]]:
    """Start and end of each cue in ms, every end after its start."""
    spans = []
    for index, segment in enumerate(segments):
        start, end = _millis(segment.start), _millis(segment.end)
        if end <= start:
            end = start + MIN_CUE_MS
            if index + 1 < len(segments):
                following = _millis(segments[index + 1].start)
                if following > start:
                    end = min(end, following)
        spans.append((start, max(end, start + 1)))
    return spans


def _clock(millis: int, separator: str) -> str:
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _cue_text(text: str) -> str:
    # A blank line would end the cue early and "-->" would read as a timing line.
    lines = (line.replace("-->", "->") for line in text.splitlines() if line.strip())
    return "\n".join(lines)


def _shown(result: TranscriptResult) -> list[TimedSegment]:
    return [s for s in result.segments if s.text.strip()]


def srt(result: TranscriptResult) -> str:
    cues = []
    shown = _shown(result)
    for number, (segment, (start, end)) in enumerate(zip(shown, cue_spans(shown), strict=True), 1):
        times = f"{_clock(start, ',')} --> {_clock(end, ',')}"
        cues.append(f"{number}\n{times}\n{_cue_text(segment.text)}\n")
    return "\n".join(cues)


def vtt(result: TranscriptResult) -> str:
    cues = ["WEBVTT\n"]
    shown = _shown(result)
    for segment, (start, end) in zip(shown, cue_spans(shown), strict=True):
        times = f"{_clock(start, '.')} --> {_clock(end, '.')}"
        cues.append(f"{times}\n{_cue_text(segment.text)}\n")
    return "\n".join(cues)


def render(result: TranscriptResult, response_format: ResponseFormat) -> RenderedBody:
    if response_format == "json":
        body = Transcription(
            text=result.text, usage=usage_of(result),
            logprobs=list(result.logprobs) if result.logprobs is not None else UNSET,
        )
        return RenderedBody(json_encoder.encode(body), "application/json")
    if response_format == "verbose_json":
        return RenderedBody(json_encoder.encode(verbose_json(result)), "application/json")
    if response_format == "srt":
        return RenderedBody(srt(result).encode("utf-8"), "text/plain")
    if response_format == "vtt":
        return RenderedBody(vtt(result).encode("utf-8"), "text/vtt")  # Litestar adds the charset
    return RenderedBody((result.text + "\n").encode("utf-8"), "text/plain")

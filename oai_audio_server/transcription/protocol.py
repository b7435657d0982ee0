"""Wire types of OpenAI's audio transcription and translation API, as msgspec Structs.

Multipart requests carry strings; ``TranscriptionOptions.from_fields`` checks them into
one typed request, with the same rules for Open WebUI's JSON variant
(``{"model", "language"?, "input_audio": {"data", "format"}}``).
"""

from __future__ import annotations

import math
import re
from typing import Literal, cast

import msgspec
from msgspec import UNSET, Struct, UnsetType

from oai_audio_server.errors import InvalidRequestError
from oai_audio_server.protocol import InputAudio
from oai_audio_server.transcription.prompts import Task

ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
RESPONSE_FORMATS: tuple[ResponseFormat, ...] = ("json", "text", "srt", "vtt", "verbose_json")
TIMESTAMP_GRANULARITIES = ("segment", "word")
MAX_TEMPERATURE = 1.0
_LANGUAGE = re.compile(r"[a-z]{2,3}")

# ---------------------------------------------------------------- requests


class TranscriptionJSONRequest(Struct, frozen=True):
    """Open WebUI's JSON body for ``/v1/audio/transcriptions``."""

    model: str
    input_audio: InputAudio
    language: str | None = None
    prompt: str | None = None
    response_format: str | None = None
    temperature: float | None = None
    stream: bool | None = None
    timestamp_granularities: list[str] | None = None
    include: list[str] | None = None


class TranscriptionOptions(Struct, frozen=True):
    """Everything a transcription or translation request asks for, but the audio."""

    task: Task
    model: str
    language: str | None = None
    prompt: str | None = None
    response_format: ResponseFormat = "json"
    temperature: float = 0.0
    stream: bool = False
    timestamp_granularities: tuple[str, ...] = ()
    include_logprobs: bool = False  # include[]=logprobs

    @classmethod
    def from_fields(
        cls,
        task: Task,
        *,
        model: str | None,
        language: str | None = None,
        prompt: str | None = None,
        response_format: str | None = None,
        temperature: str | float | None = None,
        stream: str | bool | None = None,
        timestamp_granularities: list[str] | None = None,
        include: list[str] | None = None,
    ) -> TranscriptionOptions:
        if not model or not model.strip():
            raise InvalidRequestError("the model field is required", param="model")
        granularities = _granularities(timestamp_granularities or [])
        response = _response_format(response_format)
        if granularities and response != "verbose_json":
            raise InvalidRequestError(
                "timestamp_granularities[] needs response_format verbose_json",
                param="timestamp_granularities",
            )
        include_logprobs = _include_logprobs(include or [], response, _boolean(stream, "stream"))
        return cls(
            task=task,
            model=model.strip(),
            language=_language(language) if task == "transcribe" else None,
            prompt=prompt or None,
            response_format=response,
            temperature=_temperature(temperature),
            stream=_boolean(stream, "stream"),
            timestamp_granularities=granularities,
            include_logprobs=include_logprobs,
        )


def _include_logprobs(values: list[str], response: ResponseFormat, stream: bool) -> bool:
    """``include[]=logprobs``: as OpenAI, on ``json`` replies and streams only."""
    for value in values:
        if value != "logprobs":
            raise InvalidRequestError(
                f"include[] values must be 'logprobs', not {value!r}", param="include"
            )
    if values and response != "json" and not stream:
        raise InvalidRequestError(
            "include[]=logprobs needs response_format json (or a stream); verbose_json "
            "reports avg_logprob per segment instead",
            param="include",
        )
    return bool(values)


def _language(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    # Accept "en", "EN" and region-tagged "en-US"/"en_US"; Whisper wants ISO-639-1.
    code = re.split(r"[-_]", value.strip().lower(), maxsplit=1)[0]
    if not _LANGUAGE.fullmatch(code):
        raise InvalidRequestError(
            f"language must be an ISO-639-1 code such as 'en' or 'de', not {value!r}",
            param="language",
        )
    return code


def _response_format(value: str | None) -> ResponseFormat:
    if value is None or value == "":
        return "json"
    if value not in RESPONSE_FORMATS:
        raise InvalidRequestError(
            f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, not {value!r}",
            param="response_format",
        )
    return cast(ResponseFormat, value)


def _temperature(value: str | float | None) -> float:
    if value is None or value == "":
        return 0.0
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (0.0 <= number <= MAX_TEMPERATURE):
        raise InvalidRequestError(
            f"temperature must be a number from 0 to {MAX_TEMPERATURE:g}, not {value!r}",
            param="temperature",
        )
    return number


def _boolean(value: str | bool | None, param: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off", ""):
        return False
    raise InvalidRequestError(f"{param} must be true or false, not {value!r}", param=param)


def _granularities(values: list[str]) -> tuple[str, ...]:
    for value in values:
        if value not in TIMESTAMP_GRANULARITIES:
            raise InvalidRequestError(
                f"timestamp_granularities[] values must be 'segment' or 'word', not {value!r}",
                param="timestamp_granularities",
            )
    return tuple(values)


# ---------------------------------------------------------------- replies


class UsageDuration(Struct, frozen=True):
    seconds: float
    type: Literal["duration"] = "duration"


class InputTokenDetails(Struct, frozen=True):
    audio_tokens: int
    text_tokens: int


class UsageTokens(Struct, frozen=True):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_token_details: InputTokenDetails
    type: Literal["tokens"] = "tokens"


class TranscriptLogprob(Struct, frozen=True):
    """One token of ``include[]=logprobs`` (gpt-4o-transcribe's shape)."""

    token: str
    logprob: float
    bytes: list[int]


class Transcription(Struct, frozen=True):
    """``response_format=json`` (also the shape of a translation)."""

    text: str
    usage: UsageDuration
    logprobs: list[TranscriptLogprob] | UnsetType = UNSET  # with include[]=logprobs


class TranscriptionSegment(Struct, frozen=True):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class TranscriptionVerbose(Struct, frozen=True):
    task: Literal["transcribe", "translate"]
    language: str
    duration: float
    text: str
    segments: list[TranscriptionSegment]
    usage: UsageDuration


class TranscriptTextDeltaEvent(Struct, frozen=True):
    delta: str
    type: Literal["transcript.text.delta"] = "transcript.text.delta"
    logprobs: list[TranscriptLogprob] | UnsetType = UNSET


class TranscriptTextDoneEvent(Struct, frozen=True):
    text: str
    usage: UsageTokens
    type: Literal["transcript.text.done"] = "transcript.text.done"
    logprobs: list[TranscriptLogprob] | UnsetType = UNSET


transcription_json_decoder = msgspec.json.Decoder(TranscriptionJSONRequest)

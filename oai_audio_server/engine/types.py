"""What the service layer hands the engine, and what it gets back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from oai_audio_server.audio.types import AudioSegmentFeatures
from oai_audio_server.errors import APIError

GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        # Below this, sampling is argmax anyway, and float32 would round the temperature
        # to 0 (a division by zero).
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    audio: list[AudioSegmentFeatures]
    sampling: SamplingParams
    # Official chat strips the answer; streams must add up to the same text.
    strip_whitespace: bool = True
    deadline: float | None = None  # time.monotonic() value after which the request fails
    # Seconds between text deliveries after the first (see engine/pacing.py); math.inf
    # for a client that only reads the whole answer.
    text_interval: float = 0.0


@dataclass(frozen=True)
class TextDelta:
    text: str


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Failed:
    error: APIError


GenerationEvent = TextDelta | Finished | Failed


def coalesce(events: list[GenerationEvent]) -> list[GenerationEvent]:
    """Adjacent text deltas joined: a client that falls behind gets fewer, larger chunks
    instead of one per token (each chunk costs an encode and a write on both sides)."""
    merged: list[GenerationEvent] = []
    for event in events:
        if isinstance(event, TextDelta) and merged and isinstance(merged[-1], TextDelta):
            merged[-1] = TextDelta(merged[-1].text + event.text)
        else:
            merged.append(event)
    return merged


class GenerationHandle(Protocol):
    async def next_event(self) -> GenerationEvent: ...

    def ready_events(self) -> list[GenerationEvent]: ...

    def events(self) -> AsyncIterator[GenerationEvent]: ...

    def cancel(self) -> None: ...

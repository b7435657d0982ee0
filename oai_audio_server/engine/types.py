"""What the service layer hands the engine, and what it gets back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from oai_audio_server.audio.types import AudioSegmentFeatures
from oai_audio_server.errors import APIError

GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint on the output (structured outputs), compiled in engine/grammar.py."""

    kind: Literal["json_schema", "json_object"]
    schema: str = ""  # the JSON schema as canonical JSON text (json_schema only)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, -100..100)
    logprobs: bool = False
    top_logprobs: int = 0  # 0-20, with logprobs
    grammar: GrammarSpec | None = None

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
    # Another choice (``n`` > 1) of the previous request of the same group, with the same
    # prompt and audio: the engine prefills the prompt once and shares its blocks.
    same_prompt_as_previous: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log probability and the most likely alternatives, as
    (token id, log probability) pairs (see engine/sampling.py for the distribution)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    text: str
    # The tokens accepted since the last delta, for a request that asked for them.
    logprobs: tuple[TokenLogprob, ...] = ()


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache


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
            previous = merged[-1]
            merged[-1] = TextDelta(previous.text + event.text, previous.logprobs + event.logprobs)
        else:
            merged.append(event)
    return merged


class GenerationHandle(Protocol):
    async def next_event(self) -> GenerationEvent: ...

    def ready_events(self) -> list[GenerationEvent]: ...

    def events(self) -> AsyncIterator[GenerationEvent]: ...

    def cancel(self) -> None: ...

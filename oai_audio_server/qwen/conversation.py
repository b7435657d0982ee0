"""A conversation in Qwen's own terms: a system text, (query, response) history, a query."""

from __future__ import annotations

from dataclasses import dataclass, field

from oai_audio_server.audio.types import PreparedAudio


@dataclass(frozen=True)
class TextItem:
    text: str


@dataclass(frozen=True)
class AudioItem:
    audio: PreparedAudio


UserItem = TextItem | AudioItem

DEFAULT_SYSTEM = "You are a helpful assistant."


@dataclass(frozen=True)
class HistoryTurn:
    query: tuple[UserItem, ...]
    response: str


@dataclass(frozen=True)
class Conversation:
    query: tuple[UserItem, ...]
    history: tuple[HistoryTurn, ...] = field(default_factory=tuple)
    system: str = DEFAULT_SYSTEM

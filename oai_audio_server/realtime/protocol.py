"""Wire types of OpenAI's Realtime API (GA event names), as msgspec Structs.

Client events are decoded in two steps: first only ``type`` and ``event_id`` (so an
unknown type or a bad field still gets an error event that names the client's event),
then the event's own Struct. Server events carry their ``type`` as the Struct tag and
match the openai SDK's ``openai.types.realtime`` models (the tests validate them there).
Only what this server honours is declared; other fields of a client event are ignored,
as OpenAI's own server ignores fields it does not know.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

import msgspec
from msgspec import UNSET, Struct, UnsetType

# ---------------------------------------------------------------- session


class AudioFormat(Struct, frozen=True, omit_defaults=True):
    type: Literal["audio/pcm", "audio/pcmu", "audio/pcma"] = "audio/pcm"
    rate: int | None = None  # audio/pcm only: 24000 (OpenAI's only rate) or 16000


class TranscriptionConfig(Struct, frozen=True):
    model: str | None = None
    language: str | None = None
    prompt: str | None = None


class TurnDetection(Struct, frozen=True):
    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True


class AudioInput(Struct, frozen=True):
    format: AudioFormat = AudioFormat(rate=24000)
    transcription: TranscriptionConfig | None = None
    turn_detection: TurnDetection | None = None
    noise_reduction: None = None  # never applied: always reported as off


class AudioConfig(Struct, frozen=True):
    input: AudioInput = AudioInput()


class RealtimeSession(Struct, frozen=True, tag="realtime", tag_field="type"):
    id: str
    model: str
    object: str = "realtime.session"
    output_modalities: tuple[str, ...] = ("text",)
    instructions: str | None = None
    max_output_tokens: int | Literal["inf"] = "inf"
    audio: AudioConfig = AudioConfig()
    include: tuple[str, ...] | None = None


class TranscriptionSession(Struct, frozen=True, tag="transcription", tag_field="type"):
    id: str
    object: str = "realtime.transcription_session"
    audio: AudioConfig = AudioConfig()
    include: tuple[str, ...] | None = None


Session = RealtimeSession | TranscriptionSession

# A session.update carries only what changes: absent fields keep their value, a null
# turn_detection or transcription turns it off.


class AudioFormatPatch(Struct, frozen=True):
    type: str = "audio/pcm"
    rate: int | None = None


class TurnDetectionPatch(Struct, frozen=True):
    type: str = "server_vad"
    threshold: float | UnsetType = UNSET
    prefix_padding_ms: int | UnsetType = UNSET
    silence_duration_ms: int | UnsetType = UNSET
    create_response: bool | UnsetType = UNSET
    interrupt_response: bool | UnsetType = UNSET


class TranscriptionPatch(Struct, frozen=True):
    model: str | None = None
    language: str | None = None
    prompt: str | None = None


class AudioInputPatch(Struct, frozen=True):
    format: AudioFormatPatch | UnsetType = UNSET
    transcription: TranscriptionPatch | None | UnsetType = UNSET
    turn_detection: TurnDetectionPatch | None | UnsetType = UNSET
    noise_reduction: dict[str, Any] | None | UnsetType = UNSET


class AudioOutputPatch(Struct, frozen=True):
    format: dict[str, Any] | None | UnsetType = UNSET
    voice: str | UnsetType = UNSET


class AudioPatch(Struct, frozen=True):
    input: AudioInputPatch | UnsetType = UNSET
    output: AudioOutputPatch | UnsetType = UNSET


class SessionPatch(Struct, frozen=True):
    type: str | UnsetType = UNSET
    model: str | UnsetType = UNSET
    instructions: str | None | UnsetType = UNSET
    output_modalities: list[str] | UnsetType = UNSET
    max_output_tokens: int | str | None | UnsetType = UNSET
    audio: AudioPatch | UnsetType = UNSET
    include: list[str] | None | UnsetType = UNSET


# ---------------------------------------------------------------- conversation items


class ContentPart(Struct, frozen=True, omit_defaults=True):
    type: str
    text: str | None = None
    audio: str | None = None  # never echoed back (the audio stays on the server)
    transcript: str | None = None


class MessageItem(Struct, frozen=True):
    role: Literal["user", "assistant", "system"]
    content: list[ContentPart]
    type: Literal["message"] = "message"
    id: str | None = None
    object: str = "realtime.item"
    status: Literal["completed", "incomplete", "in_progress"] = "completed"


# ---------------------------------------------------------------- client events


class EventHead(Struct, frozen=True):
    """What every client event is read for first."""

    type: str
    event_id: str | None = None


class SessionUpdateEvent(Struct, frozen=True):
    session: SessionPatch
    event_id: str | None = None


class AppendEvent(Struct, frozen=True):
    audio: str
    event_id: str | None = None


class BareEvent(Struct, frozen=True):
    """commit, clear, and the other events that carry nothing but their type."""

    event_id: str | None = None


class ItemCreateEvent(Struct, frozen=True):
    item: MessageItem
    previous_item_id: str | None = None
    event_id: str | None = None


class ItemReference(Struct, frozen=True, tag="item_reference", tag_field="type"):
    """An existing item of the session, named in ``response.input``."""

    id: str


class InputMessage(Struct, frozen=True, tag="message", tag_field="type"):
    """A message item given inline in ``response.input`` (the fields of a
    ``conversation.item.create`` item)."""

    role: Literal["user", "assistant", "system"]
    content: list[ContentPart]
    id: str | None = None

    def as_item(self) -> MessageItem:
        return MessageItem(role=self.role, content=self.content, id=self.id)


class ResponseParams(Struct, frozen=True):
    instructions: str | None = None
    max_output_tokens: int | str | None = None
    output_modalities: list[str] | None = None
    # "auto" (or absent): the answer joins the default conversation; "none": an
    # out-of-band response whose answer is added to no conversation.
    conversation: str | None = None
    # Present: the response's whole context (a new one, not the default conversation).
    input: list[InputMessage | ItemReference] | None = None
    metadata: dict[str, str] | None = None
    # Not in OpenAI's GA schema (its beta had it): a server extension, so that a client
    # can ask for greedy answers as it can from chat completions.
    temperature: float | None = None


class ResponseCreateEvent(Struct, frozen=True):
    response: ResponseParams = ResponseParams()
    event_id: str | None = None


class ResponseCancelEvent(Struct, frozen=True):
    response_id: str | None = None
    event_id: str | None = None


class ItemIdEvent(Struct, frozen=True):
    """conversation.item.retrieve and conversation.item.delete."""

    item_id: str
    event_id: str | None = None


class ItemTruncateEvent(Struct, frozen=True):
    item_id: str
    content_index: int
    audio_end_ms: int
    event_id: str | None = None


CLIENT_EVENTS: dict[str, type[Struct]] = {
    "session.update": SessionUpdateEvent,
    "input_audio_buffer.append": AppendEvent,
    "input_audio_buffer.commit": BareEvent,
    "input_audio_buffer.clear": BareEvent,
    "conversation.item.create": ItemCreateEvent,
    "response.create": ResponseCreateEvent,
    "response.cancel": ResponseCancelEvent,
    "conversation.item.retrieve": ItemIdEvent,
    "conversation.item.delete": ItemIdEvent,
    "conversation.item.truncate": ItemTruncateEvent,
}
CLIENT_DECODERS = {name: msgspec.json.Decoder(kind) for name, kind in CLIENT_EVENTS.items()}
HEAD_DECODER = msgspec.json.Decoder(EventHead)

# ---------------------------------------------------------------- server events


def event_id() -> str:
    return f"event_{uuid.uuid4().hex[:24]}"


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class ServerEvent(Struct, frozen=True, tag_field="type", kw_only=True):
    event_id: str = msgspec.field(default_factory=event_id)


class ErrorDetail(Struct, frozen=True):
    type: str
    code: str | None
    message: str
    param: str | None
    event_id: str | None  # the client event that caused it


class ErrorEvent(ServerEvent, frozen=True, tag="error"):
    error: ErrorDetail


class SessionCreated(ServerEvent, frozen=True, tag="session.created"):
    session: Session


class SessionUpdated(ServerEvent, frozen=True, tag="session.updated"):
    session: Session


class BufferCommitted(ServerEvent, frozen=True, tag="input_audio_buffer.committed"):
    item_id: str
    previous_item_id: str | None


class BufferCleared(ServerEvent, frozen=True, tag="input_audio_buffer.cleared"):
    pass


class SpeechStarted(ServerEvent, frozen=True, tag="input_audio_buffer.speech_started"):
    audio_start_ms: int
    item_id: str


class SpeechStopped(ServerEvent, frozen=True, tag="input_audio_buffer.speech_stopped"):
    audio_end_ms: int
    item_id: str


class ItemAdded(ServerEvent, frozen=True, tag="conversation.item.added"):
    item: MessageItem
    previous_item_id: str | None


class ItemDone(ServerEvent, frozen=True, tag="conversation.item.done"):
    item: MessageItem
    previous_item_id: str | None


class ItemRetrieved(ServerEvent, frozen=True, tag="conversation.item.retrieved"):
    item: MessageItem


class ItemDeleted(ServerEvent, frozen=True, tag="conversation.item.deleted"):
    item_id: str


class TranscriptionDelta(
    ServerEvent, frozen=True, tag="conversation.item.input_audio_transcription.delta"
):
    item_id: str
    content_index: int
    delta: str


class TranscriptionUsage(Struct, frozen=True):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    type: str = "tokens"


class TranscriptionCompleted(
    ServerEvent, frozen=True, tag="conversation.item.input_audio_transcription.completed"
):
    item_id: str
    content_index: int
    transcript: str
    usage: TranscriptionUsage


class TranscriptionFailed(
    ServerEvent, frozen=True, tag="conversation.item.input_audio_transcription.failed"
):
    item_id: str
    content_index: int
    error: ErrorDetail


class StatusDetails(Struct, frozen=True, omit_defaults=True):
    type: str
    reason: str | None = None
    error: dict[str, Any] | None = None


class ResponseUsage(Struct, frozen=True):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class Response(Struct, frozen=True):
    id: str
    status: Literal["in_progress", "completed", "cancelled", "failed", "incomplete"]
    output: list[MessageItem]
    object: str = "realtime.response"
    conversation_id: str | None = None
    output_modalities: tuple[str, ...] = ("text",)
    max_output_tokens: int | Literal["inf"] = "inf"
    status_details: StatusDetails | None = None
    usage: ResponseUsage | None = None
    metadata: dict[str, str] | None = None


class ResponseCreated(ServerEvent, frozen=True, tag="response.created"):
    response: Response


class ResponseDone(ServerEvent, frozen=True, tag="response.done"):
    response: Response


class OutputItemAdded(ServerEvent, frozen=True, tag="response.output_item.added"):
    response_id: str
    output_index: int
    item: MessageItem


class OutputItemDone(ServerEvent, frozen=True, tag="response.output_item.done"):
    response_id: str
    output_index: int
    item: MessageItem


class Part(Struct, frozen=True):
    type: str = "text"
    text: str = ""


class ContentPartAdded(ServerEvent, frozen=True, tag="response.content_part.added"):
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    part: Part


class ContentPartDone(ServerEvent, frozen=True, tag="response.content_part.done"):
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    part: Part


class OutputTextDelta(ServerEvent, frozen=True, tag="response.output_text.delta"):
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    delta: str


class OutputTextDone(ServerEvent, frozen=True, tag="response.output_text.done"):
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    text: str


encoder = msgspec.json.Encoder()

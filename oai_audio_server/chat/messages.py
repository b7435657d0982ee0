"""OpenAI messages to a Qwen Conversation.

Rules for message orders the official ``model.chat`` has no notion of:
* ``system`` and ``developer`` messages, wherever they stand, are joined with newlines
  into Qwen's system text (default: "You are a helpful assistant.").
* Consecutive ``user`` messages merge into one user turn, as do consecutive
  ``assistant`` messages (their texts joined with a newline).
* Assistant turns before the first user message become a history turn whose query is empty.
* The conversation must end with a user turn (400 otherwise): the model answers it.
* ``tool``/``function`` messages are refused (this model has no tool calling); an
  assistant message that carries only ``tool_calls`` counts as empty text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from oai_audio_server.audio.types import PreparedAudio
from oai_audio_server.errors import APIError, InvalidRequestError
from oai_audio_server.protocol import (
    CONTENT_PART_TYPES,
    AudioURLPart,
    ChatMessage,
    FilePart,
    ImageURLPart,
    InputAudioPart,
    TextPart,
)
from oai_audio_server.qwen.conversation import (
    DEFAULT_SYSTEM,
    AudioItem,
    Conversation,
    HistoryTurn,
    TextItem,
    UserItem,
)
from oai_audio_server.settings import limit_name

# Messages handled between two returns to the event loop (a few ms of work at most).
YIELD_EVERY = 256

AudioPart = InputAudioPart | AudioURLPart | FilePart
AudioLoader = Callable[[AudioPart], Awaitable[PreparedAudio]]


def not_an_audio_file(what: str) -> InvalidRequestError:
    """A file part this model cannot hear."""
    return InvalidRequestError(
        f"file parts are accepted when their file_data is a data:audio/... URI (the model "
        f"hears audio); this one {what}. Accepted part types: "
        + ", ".join(CONTENT_PART_TYPES),
        code="unsupported_content_type",
    )


@dataclass
class AudioBudget:
    max_items: int
    max_seconds: float
    items: int = 0
    seconds: float = 0.0

    def charge(self, audio: PreparedAudio, param: str) -> None:
        self.items += 1
        self.seconds += audio.duration_seconds
        if self.items > self.max_items:
            raise InvalidRequestError(
                f"too many audio items: this server takes at most {self.max_items} per "
                f"request ({limit_name('max_audios_per_request')}); send fewer, or join "
                "short clips into one file",
                param=param,
                code="too_many_audio_items",
            )
        if self.seconds > self.max_seconds:
            raise InvalidRequestError(
                f"too much audio: {self.seconds:.1f} s in this request, over this "
                f"server's limit of {self.max_seconds:g} s "
                f"({limit_name('max_audio_seconds')}); send shorter audio or fewer items",
                param=param,
                code="audio_too_long",
            )


@dataclass
class _Turn:
    role: str  # "user" or "assistant"
    items: list[UserItem] = field(default_factory=list)
    index: int = 0


def _text_of(message: ChatMessage, param: str) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, TextPart):
            raise InvalidRequestError(
                f"{message.role} messages may only contain text parts",
                param=f"{param}.content[{j}]",
            )
        texts.append(part.text)
    return "".join(texts)


async def _user_items(
    message: ChatMessage, param: str, load_audio: AudioLoader, budget: AudioBudget
) -> list[UserItem]:
    content = message.content
    if content is None:
        return []
    if isinstance(content, str):
        return [TextItem(content)]
    items: list[UserItem] = []
    for j, part in enumerate(content):
        part_param = f"{param}.content[{j}]"
        if isinstance(part, TextPart):
            items.append(TextItem(part.text))
        elif isinstance(part, ImageURLPart):
            raise InvalidRequestError(
                "image input is not supported by this model; send text and audio",
                param=part_param,
                code="unsupported_content_type",
            )
        else:
            if isinstance(part, FilePart) and part.file.file_data is None:
                what = "refers to an uploaded file_id" if part.file.file_id else "has no file_data"
                raise not_an_audio_file(what).with_param(f"{part_param}.file")
            try:
                audio = await load_audio(part)
            except APIError as exc:
                raise exc.with_param(part_param) from None
            budget.charge(audio, part_param)
            items.append(AudioItem(audio))
    return items


async def to_conversation(
    messages: list[ChatMessage], load_audio: AudioLoader, budget: AudioBudget
) -> Conversation:
    if not messages:
        raise InvalidRequestError("messages must not be empty", param="messages")
    system: list[str] = []
    turns: list[_Turn] = []
    for i, message in enumerate(messages):
        if i % YIELD_EVERY == YIELD_EVERY - 1:
            await asyncio.sleep(0)  # a long list must not hold the event loop
        param = f"messages[{i}]"
        role = message.role
        if role in ("system", "developer"):
            system.append(_text_of(message, param))
            continue
        if role in ("tool", "function"):
            raise InvalidRequestError(
                f"'{role}' messages are not supported: this model has no tool calling",
                param=f"{param}.role",
            )
        if role == "user":
            if message.content is None or message.content == []:
                raise InvalidRequestError(
                    "a user message needs content: text, audio or both",
                    param=f"{param}.content",
                )
            items = await _user_items(message, param, load_audio, budget)
        else:
            items = [TextItem(_text_of(message, param))]
        if turns and turns[-1].role == role:
            turns[-1].items += [TextItem("\n"), *items]
            turns[-1].index = i
        else:
            turns.append(_Turn(role, items, i))

    if not any(turn.role == "user" for turn in turns):
        raise InvalidRequestError("messages need at least one user message", param="messages")
    if turns[-1].role != "user":
        raise InvalidRequestError(
            "the last message must be a user message: the model answers it",
            param=f"messages[{turns[-1].index}]",
        )
    if turns[0].role == "assistant":
        turns.insert(0, _Turn("user"))

    history = []
    for query, response in zip(turns[:-1:2], turns[1:-1:2], strict=True):
        answer = "".join(item.text for item in response.items if isinstance(item, TextItem))
        history.append(HistoryTurn(query=tuple(query.items), response=answer))
    return Conversation(
        query=tuple(turns[-1].items),
        history=tuple(history),
        system="\n".join(system) if system else DEFAULT_SYSTEM,
    )

"""Responses of a conversation session: the items as chat messages, through the chat
completions' own rules and prompt builder, into the engine, and back as response events.

One response runs at a time, in a task of its own, so that client events keep being read
while it is written (``response.cancel`` among them). Cancelling it frees its engine row
at once and still ends it with ``response.done`` (status ``cancelled``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from oai_audio_server.audio.types import PreparedAudio
from oai_audio_server.chat.messages import AudioBudget, AudioPart, to_conversation
from oai_audio_server.chat.service import sampling_params, text_interval
from oai_audio_server.engine.types import (
    Failed,
    Finished,
    GenerationHandle,
    GenerationRequest,
    TextDelta,
)
from oai_audio_server.errors import APIError, EngineError
from oai_audio_server.protocol import (
    AudioURLPart,
    ChatCompletionRequest,
    ChatMessage,
    InputAudio,
    InputAudioPart,
    TextPart,
)
from oai_audio_server.realtime import protocol as wire
from oai_audio_server.realtime.errors import invalid
from oai_audio_server.runtime import Runtime
from oai_audio_server.settings import Settings
from oai_audio_server.sse import next_events

Emit = Callable[[wire.ServerEvent], Awaitable[None]]


def output_tokens(value: int | str | None, param: str, settings: Settings) -> int | None:
    """``max_output_tokens`` as a number (None: as many as fit), or the error."""
    if value is None or value == "inf":
        return None
    if isinstance(value, int) and 1 <= value <= settings.max_tokens_limit:
        return value
    raise invalid(
        f"max_output_tokens must be 'inf' or an integer from 1 to "
        f"{settings.max_tokens_limit}",
        param,
    )


@dataclass
class Item:
    """A conversation item; audio parts hold their decoded features (or the decode)."""

    id: str
    role: Literal["user", "assistant", "system"]
    parts: list[wire.ContentPart]
    audio: dict[int, asyncio.Task[PreparedAudio]] = field(default_factory=dict)
    status: Literal["completed", "incomplete", "in_progress"] = "completed"

    def wire(self) -> wire.MessageItem:
        # Audio is never echoed back: the client has it, and it can be megabytes.
        parts = [msgspec.structs.replace(p, audio=None) for p in self.parts]
        return wire.MessageItem(role=self.role, content=parts, id=self.id, status=self.status)


@dataclass
class ActiveResponse:
    id: str
    task: asyncio.Task[None]
    cancel_reason: str | None = None


class Responder:
    def __init__(self, settings: Settings, runtime: Runtime, items: list[Item], emit: Emit) -> None:
        self._settings = settings
        self._runtime = runtime
        self._items = items  # the session's conversation, shared
        self._emit = emit
        self._response: ActiveResponse | None = None

    @property
    def active(self) -> bool:
        return self._response is not None

    async def _messages(
        self, instructions: str | None
    ) -> tuple[list[ChatMessage], dict[str, PreparedAudio]]:
        """The conversation as chat messages, for the chat completions' own rules."""
        messages: list[ChatMessage] = []
        audio: dict[str, PreparedAudio] = {}
        if instructions:
            messages.append(ChatMessage(role="system", content=instructions))
        for item in self._items:
            if item.role != "user":
                text = "".join(part.text or "" for part in item.parts)
                messages.append(ChatMessage(role=item.role, content=text))
                continue
            content: list[TextPart | InputAudioPart | AudioURLPart] = []
            for index, part in enumerate(item.parts):
                if index in item.audio:
                    key = f"{item.id}/{index}"
                    audio[key] = await item.audio[index]
                    content.append(InputAudioPart(input_audio=InputAudio(data=key, format="wav")))
                else:
                    content.append(TextPart(text=part.text or ""))
            messages.append(ChatMessage(role="user", content=content))  # type: ignore[arg-type]
        return messages, audio

    def start(
        self,
        params: wire.ResponseParams,
        model: str,
        instructions: str | None,
        max_output_tokens: int | None,
    ) -> None:
        if self._response is not None:
            raise invalid(
                f"Conversation already has an active response in progress: "
                f"{self._response.id}. Wait until the response is finished before creating "
                "a new one.",
                None,
                "conversation_already_has_active_response",
            )
        if params.output_modalities not in (None, ["text"]):
            raise invalid(
                "this model answers in text only: set output_modalities to [\"text\"]",
                "response.output_modalities",
                "unsupported_value",
            )
        max_tokens = max_output_tokens
        if params.max_output_tokens is not None:
            max_tokens = output_tokens(
                params.max_output_tokens, "response.max_output_tokens", self._settings
            )
        if params.instructions is not None:
            instructions = params.instructions
        temperature = params.temperature
        if temperature is not None and not 0.0 <= temperature <= 2.0:
            raise invalid("temperature must be between 0 and 2", "response.temperature")
        response_id = wire.new_id("resp")
        task = asyncio.ensure_future(
            self._respond(response_id, model, instructions, max_tokens, temperature)
        )
        self._response = ActiveResponse(response_id, task)

    async def cancel(
        self, response_id: str | None, reason: str = "client_cancelled", quiet: bool = False
    ) -> None:
        active = self._response
        if active is None or (response_id is not None and response_id != active.id):
            if quiet:
                return
            raise invalid(
                "Cancellation failed: no active response found"
                + (f" with id {response_id}" if response_id else ""),
                "response_id" if response_id else None,
                "response_cancel_not_active",
            )
        active.cancel_reason = reason
        active.task.cancel()
        # The response ends (response.done, its row freed) before the next event is read.
        await asyncio.wait({active.task})

    async def _prepare_generation(
        self,
        response_id: str,
        model: str,
        instructions: str | None,
        max_tokens: int | None,
        temperature: float | None,
    ) -> GenerationRequest:
        messages, audio = await self._messages(instructions)

        async def load(part: AudioPart) -> PreparedAudio:
            assert isinstance(part, InputAudioPart)
            return audio[part.input_audio.data]

        budget = AudioBudget(
            max_items=self._settings.max_audios_per_request,
            max_seconds=self._settings.max_audio_seconds,
        )
        conversation = await to_conversation(messages, load, budget)
        runtime = self._runtime
        prompt = await runtime.offload(runtime.prompt_builder.build, conversation)
        request = ChatCompletionRequest(
            model=model, messages=[], max_tokens=max_tokens, temperature=temperature
        )
        sampling = sampling_params(request, runtime.bundle, self._settings, len(prompt.token_ids))
        return GenerationRequest(
            request_id=response_id,
            prompt_ids=prompt.token_ids,
            audio=prompt.audio_segments,
            sampling=sampling,
            deadline=time.monotonic() + self._settings.request_timeout,
            text_interval=text_interval(self._settings, True),
        )

    async def _respond(
        self,
        response_id: str,
        model: str,
        instructions: str | None,
        max_tokens: int | None,
        temperature: float | None,
    ) -> None:
        item = Item(wire.new_id("item"), "assistant", [], status="in_progress")
        state = _ResponseState(response_id, item, max_tokens)
        handle: GenerationHandle | None = None
        try:
            await self._emit(wire.ResponseCreated(response=state.wire("in_progress", [])))
            generation = await self._prepare_generation(
                response_id, model, instructions, max_tokens, temperature
            )
            handle = self._runtime.submit(generation)
            await self._open_output(state)
            await self._stream_text(state, handle)
        except asyncio.CancelledError:
            active = self._response
            if active is None or active.cancel_reason is None:
                raise  # the session is closing: nobody to tell
            state.status, state.reason = "cancelled", active.cancel_reason
        except Exception as exc:
            error = exc if isinstance(exc, APIError) else EngineError(f"response failed: {exc}")
            state.status, state.error = "failed", error
        finally:
            if handle is not None:
                handle.cancel()  # at once: the row leaves the batch
            if self._response is not None and self._response.id == response_id:
                self._response = None
        await self._finish(state)

    async def _open_output(self, state: _ResponseState) -> None:
        item = state.item
        previous = self._items[-1].id if self._items else None
        self._items.append(item)
        state.opened = True
        await self._emit(
            wire.OutputItemAdded(response_id=state.id, output_index=0, item=item.wire())
        )
        await self._emit(wire.ItemAdded(item=item.wire(), previous_item_id=previous))
        state.previous = previous
        await self._emit(
            wire.ContentPartAdded(
                response_id=state.id,
                item_id=item.id,
                output_index=0,
                content_index=0,
                part=wire.Part(),
            )
        )

    async def _stream_text(self, state: _ResponseState, handle: GenerationHandle) -> None:
        while True:
            events = await next_events(handle)
            for event in events or []:
                if isinstance(event, TextDelta) and event.text:
                    state.text += event.text
                    await self._emit(
                        wire.OutputTextDelta(
                            response_id=state.id,
                            item_id=state.item.id,
                            output_index=0,
                            content_index=0,
                            delta=event.text,
                        )
                    )
                elif isinstance(event, Failed):
                    raise event.error
                elif isinstance(event, Finished):
                    state.usage = wire.ResponseUsage(
                        input_tokens=event.prompt_tokens,
                        output_tokens=event.completion_tokens,
                        total_tokens=event.prompt_tokens + event.completion_tokens,
                    )
                    if event.reason == "length":
                        state.status, state.reason = "incomplete", "max_output_tokens"
                    return

    async def _finish(self, state: _ResponseState) -> None:
        item = state.item
        item.parts = [wire.ContentPart(type="output_text", text=state.text)]
        item.status = "completed" if state.status == "completed" else "incomplete"
        if state.opened:
            await self._emit(
                wire.OutputTextDone(
                    response_id=state.id,
                    item_id=item.id,
                    output_index=0,
                    content_index=0,
                    text=state.text,
                )
            )
            await self._emit(
                wire.ContentPartDone(
                    response_id=state.id,
                    item_id=item.id,
                    output_index=0,
                    content_index=0,
                    part=wire.Part(text=state.text),
                )
            )
            await self._emit(
                wire.OutputItemDone(response_id=state.id, output_index=0, item=item.wire())
            )
            await self._emit(wire.ItemDone(item=item.wire(), previous_item_id=state.previous))
        output = [item.wire()] if state.opened else []
        await self._emit(wire.ResponseDone(response=state.wire(state.status, output)))

    async def close(self) -> None:
        if self._response is not None:
            self._response.task.cancel()
            await asyncio.wait({self._response.task})


@dataclass
class _ResponseState:
    id: str
    item: Item
    max_tokens: int | None
    status: Literal["completed", "cancelled", "failed", "incomplete"] = "completed"
    reason: str | None = None
    error: APIError | None = None
    text: str = ""
    opened: bool = False
    previous: str | None = None
    usage: wire.ResponseUsage | None = None

    def wire(self, status: str, output: list[wire.MessageItem]) -> wire.Response:
        details = None
        if status in ("cancelled", "incomplete"):
            details = wire.StatusDetails(type=status, reason=self.reason)
        elif status == "failed" and self.error is not None:
            details = wire.StatusDetails(
                type="failed",
                error={"type": self.error.error_type, "code": self.error.code,
                       "message": self.error.message},
            )
        return wire.Response(
            id=self.id,
            status=status,  # type: ignore[arg-type]
            output=output,
            max_output_tokens=self.max_tokens or "inf",
            status_details=details,
            usage=self.usage,
        )

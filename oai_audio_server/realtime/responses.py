"""Responses of a conversation session: the items as chat messages, through the chat
completions' own rules and prompt builder, into the engine, and back as response events.

Each response runs in a task of its own, so that client events keep being read while it
is written (``response.cancel`` among them). One at a time writes to the default
conversation; out-of-band ones (``conversation: "none"``, their answer added to no
conversation) may run beside it, and ``response.input`` gives a response a context of its
own instead of the default conversation. Cancelling a response frees its engine row at
once and still ends it with ``response.done`` (status ``cancelled``).
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
# Responses one session may run at once: the default conversation's and out-of-band ones
# (conversation "none"); each holds an engine row, so one session cannot fill the batch.
MAX_ACTIVE_RESPONSES = 4
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512


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
    seconds: float = 0.0  # of audio, over all its parts

    def discard(self) -> None:
        """Stop decoding its audio (an item refused after its parts were read)."""
        for decode in self.audio.values():
            decode.cancel()

    @property
    def audio_count(self) -> int:
        return len(self.audio)

    @property
    def text_chars(self) -> int:
        return sum(len(part.text or "") for part in self.parts)

    def wire(self) -> wire.MessageItem:
        # Audio is never echoed back: the client has it, and it can be megabytes.
        parts = [msgspec.structs.replace(p, audio=None) for p in self.parts]
        return wire.MessageItem(role=self.role, content=parts, id=self.id, status=self.status)


@dataclass
class ActiveResponse:
    state: _ResponseState
    in_conversation: bool  # its answer joins the default conversation
    context: list[Item] | None  # response.input; None: the default conversation
    task: asyncio.Task[None] | None = None
    cancel_reason: str | None = None
    started: bool = False  # its task has begun (a task cancelled before that runs nothing)


def check_metadata(metadata: dict[str, str] | None) -> None:
    """OpenAI's limits on ``metadata``: 16 pairs, keys of 64 and values of 512 chars."""
    if metadata is None:
        return
    if len(metadata) > METADATA_PAIRS:
        raise invalid(
            f"metadata holds {len(metadata)} pairs; at most {METADATA_PAIRS} are allowed",
            "response.metadata",
        )
    for key, value in metadata.items():
        if len(key) > METADATA_KEY_CHARS or len(value) > METADATA_VALUE_CHARS:
            raise invalid(
                f"metadata keys may hold {METADATA_KEY_CHARS} characters and values "
                f"{METADATA_VALUE_CHARS}; {key[:80]!r} is longer",
                f"response.metadata.{key[:80]}",
            )


class Responder:
    def __init__(
        self,
        settings: Settings,
        runtime: Runtime,
        items: list[Item],
        emit: Emit,
        conversation_id: str,
    ) -> None:
        self._settings = settings
        self._runtime = runtime
        self._items = items  # the session's default conversation, shared
        self._emit = emit
        self._conversation_id = conversation_id
        self._active: dict[str, ActiveResponse] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # also those still sending their end

    @property
    def active(self) -> bool:
        """A response that writes to the default conversation is running."""
        return self._default() is not None

    def _default(self) -> ActiveResponse | None:
        return next((r for r in self._active.values() if r.in_conversation), None)

    async def _messages(
        self, instructions: str | None, items: list[Item]
    ) -> tuple[list[ChatMessage], dict[str, PreparedAudio]]:
        """The items as chat messages, for the chat completions' own rules."""
        messages: list[ChatMessage] = []
        audio: dict[str, PreparedAudio] = {}
        if instructions:
            messages.append(ChatMessage(role="system", content=instructions))
        for item in items:
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

    async def start(
        self,
        params: wire.ResponseParams,
        model: str,
        instructions: str | None,
        max_output_tokens: int | None,
        context: list[Item] | None = None,
    ) -> None:
        """Check ``response.create`` and start the response (``context``: the items of
        ``response.input``, already resolved; None for the default conversation)."""
        if params.conversation not in (None, "auto", "none"):
            raise invalid(
                f"conversation {params.conversation!r} is not supported: use 'auto' (the "
                "default conversation) or 'none' (an out-of-band response)",
                "response.conversation",
            )
        in_conversation = params.conversation != "none"
        current = self._default()
        if in_conversation and current is not None:
            raise invalid(
                f"Conversation already has an active response in progress: "
                f"{current.state.id}. Wait until the response is finished before creating "
                "a new one (or create it with conversation 'none').",
                None,
                "conversation_already_has_active_response",
            )
        if len(self._active) >= MAX_ACTIVE_RESPONSES:
            raise invalid(
                f"this session already runs {MAX_ACTIVE_RESPONSES} responses, the most it "
                "may at once; wait for one to finish (response.done) or cancel one",
                None,
                "too_many_active_responses",
            )
        if params.output_modalities not in (None, ["text"]):
            raise invalid(
                "this model answers in text only: set output_modalities to [\"text\"]",
                "response.output_modalities",
                "unsupported_value",
            )
        check_metadata(params.metadata)
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
        item = Item(wire.new_id("item"), "assistant", [], status="in_progress")
        state = _ResponseState(
            wire.new_id("resp"),
            item,
            max_tokens,
            conversation_id=self._conversation_id if in_conversation else None,
            metadata=params.metadata,
        )
        # Sent before the task exists, so that a response cancelled before its task ever
        # runs still reads created -> done.
        await self._emit(wire.ResponseCreated(response=state.wire("in_progress", [])))
        response = ActiveResponse(state, in_conversation, context)
        response.task = asyncio.ensure_future(
            self._respond(response, model, instructions, max_tokens, temperature)
        )
        self._active[state.id] = response
        self._tasks.add(response.task)
        response.task.add_done_callback(self._tasks.discard)

    async def cancel(
        self, response_id: str | None, reason: str = "client_cancelled", quiet: bool = False
    ) -> None:
        """Cancel ``response_id``, or without one the default conversation's response."""
        target = self._active.get(response_id) if response_id else self._default()
        if target is None or target.task is None:
            if quiet:
                return
            raise invalid(
                "Cancellation failed: no active response found"
                + (f" with id {response_id}" if response_id else ""),
                "response_id" if response_id else None,
                "response_cancel_not_active",
            )
        target.cancel_reason = reason
        target.task.cancel()
        # The response ends (response.done, its row freed) before the next event is read.
        await asyncio.wait({target.task})
        if not target.started:
            # Cancelled before its first step (a VAD turn that ended and a new one that
            # began in the same append): the coroutine never ran, so end it here.
            self._active.pop(target.state.id, None)
            target.state.status, target.state.reason = "cancelled", reason
            await self._finish(target)

    async def _prepare_generation(
        self,
        response: ActiveResponse,
        model: str,
        instructions: str | None,
        max_tokens: int | None,
        temperature: float | None,
    ) -> GenerationRequest:
        items = response.context
        if items is None:
            # An answer still being written (by another response) is not context yet.
            items = [item for item in self._items if item.status != "in_progress"]
        messages, audio = await self._messages(instructions, items)

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
            request_id=response.state.id,
            prompt_ids=prompt.token_ids,
            audio=prompt.audio_segments,
            sampling=sampling,
            deadline=time.monotonic() + self._settings.request_timeout,
            text_interval=text_interval(self._settings, True),
        )

    async def _respond(
        self,
        response: ActiveResponse,
        model: str,
        instructions: str | None,
        max_tokens: int | None,
        temperature: float | None,
    ) -> None:
        response.started = True
        state = response.state
        handle: GenerationHandle | None = None
        try:
            generation = await self._prepare_generation(
                response, model, instructions, max_tokens, temperature
            )
            handle = self._runtime.submit(generation)
            await self._open_output(response)
            await self._stream_text(state, handle)
        except asyncio.CancelledError:
            if response.cancel_reason is None:
                raise  # the session is closing: nobody to tell
            state.status, state.reason = "cancelled", response.cancel_reason
        except Exception as exc:
            error = exc if isinstance(exc, APIError) else EngineError(f"response failed: {exc}")
            state.status, state.error = "failed", error
        finally:
            if handle is not None:
                handle.cancel()  # at once: the row leaves the batch
            self._active.pop(state.id, None)
        await self._finish(response)

    async def _open_output(self, response: ActiveResponse) -> None:
        state = response.state
        item = state.item
        state.opened = True
        await self._emit(
            wire.OutputItemAdded(response_id=state.id, output_index=0, item=item.wire())
        )
        if response.in_conversation:
            previous = self._items[-1].id if self._items else None
            self._items.append(item)
            state.previous = previous
            await self._emit(wire.ItemAdded(item=item.wire(), previous_item_id=previous))
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

    async def _finish(self, response: ActiveResponse) -> None:
        state = response.state
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
            if response.in_conversation:
                await self._emit(
                    wire.ItemDone(item=item.wire(), previous_item_id=state.previous)
                )
        output = [item.wire()] if state.opened else []
        await self._emit(wire.ResponseDone(response=state.wire(state.status, output)))

    async def close(self) -> None:
        """Cancel every response (the session is closing: no events are sent)."""
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._active.clear()


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
    conversation_id: str | None = None
    metadata: dict[str, str] | None = None

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
            conversation_id=self.conversation_id,
            metadata=self.metadata,
        )

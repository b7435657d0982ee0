"""One realtime session without a web framework: client events in, server events out.

The route hands every client message to ``RealtimeSession.handle`` and sends what the
session passes to ``emit``. State: the session's settings, the input audio buffer
(int16 samples in the input format), the server VAD, the conversation's items and the
tasks that transcribe committed audio or write a response. Work that waits on the
engine runs in tasks, so events keep being read while it runs (``response.cancel``,
more audio); ``close`` cancels them all, which frees their engine rows.

A committed turn becomes the WAV file a client would upload, and goes through the same
path as /v1/audio/transcriptions (``TranscriptionService``) or, in a conversation, the
same audio intake and prompt builder as chat completions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import msgspec
import numpy as np
from msgspec import UNSET

from oai_audio_server.audio.types import PreparedAudio
from oai_audio_server.chat.messages import AudioBudget, to_conversation
from oai_audio_server.chat.service import check_model, sampling_params, text_interval
from oai_audio_server.engine.types import (
    Failed,
    Finished,
    GenerationHandle,
    GenerationRequest,
    TextDelta,
)
from oai_audio_server.errors import APIError, EngineError, InvalidRequestError
from oai_audio_server.protocol import (
    AudioURLPart,
    ChatCompletionRequest,
    ChatMessage,
    InputAudio,
    InputAudioPart,
    TextPart,
)
from oai_audio_server.realtime import protocol as wire
from oai_audio_server.realtime.audio_format import (
    decode_chunk,
    input_format,
    wav,
)
from oai_audio_server.realtime.vad import (
    FRAME_MS,
    MIN_SPEECH_MS,
    EnergyVad,
    SpeechStart,
    SpeechStop,
)
from oai_audio_server.runtime import Runtime
from oai_audio_server.settings import Settings
from oai_audio_server.sse import next_events
from oai_audio_server.transcription.protocol import TranscriptionOptions
from oai_audio_server.transcription.service import TokenTally, TranscriptionService

Kind = Literal["realtime", "transcription"]
Emit = Callable[[wire.ServerEvent], Awaitable[None]]
MIN_COMMIT_MS = 100  # OpenAI refuses shorter commits with the same code
LOGPROBS = "item.input_audio_transcription.logprobs"


class SessionLimitError(APIError):
    """A session limit was passed: the client gets this error and the socket closes."""

    status_code = 400
    error_type = "invalid_request_error"


def error_detail(error: APIError, client_event_id: str | None = None) -> wire.ErrorDetail:
    return wire.ErrorDetail(
        type=error.error_type,
        code=error.code,
        message=error.message,
        param=error.param,
        event_id=client_event_id,
    )


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return InvalidRequestError(message, param=param, code=code)


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


class RealtimeSession:
    def __init__(
        self,
        settings: Settings,
        runtime: Runtime,
        transcriber: TranscriptionService,
        kind: Kind,
        model: str,
        emit: Emit,
    ) -> None:
        self._settings = settings
        self._runtime = runtime
        self._transcriber = transcriber
        self._emit = emit
        self.kind: Kind = kind
        self.id = wire.new_id("sess")
        self._model = model
        self._instructions: str | None = None
        self._max_output_tokens: int | None = None
        self._format = input_format("audio/pcm", None)
        self._transcription: wire.TranscriptionConfig | None = (
            wire.TranscriptionConfig(model=model) if kind == "transcription" else None
        )
        # Server VAD on, as OpenAI's sessions of both kinds start.
        self._turn_detection: wire.TurnDetection | None = wire.TurnDetection()
        self._vad: EnergyVad | None = self._new_vad(0)
        self._buffer: list[np.ndarray] = []
        self._buffered = 0  # samples in the buffer
        self._buffer_start = 0  # session sample index of the buffer's first sample
        self._written = 0  # samples received since the session began
        self._speech_item: str | None = None  # item id announced by speech_started
        self._items: list[Item] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._response: ActiveResponse | None = None

    # ------------------------------------------------------------ session settings

    def wire_session(self) -> wire.Session:
        audio = wire.AudioConfig(
            input=wire.AudioInput(
                format=wire.AudioFormat(
                    type=self._format.type,  # type: ignore[arg-type]
                    rate=self._format.rate if self._format.type == "audio/pcm" else None,
                ),
                transcription=self._transcription,
                turn_detection=self._turn_detection,
            )
        )
        if self.kind == "transcription":
            return wire.TranscriptionSession(id=self.id, audio=audio)
        return wire.RealtimeSession(
            id=self.id,
            model=self._model,
            instructions=self._instructions,
            max_output_tokens=self._max_output_tokens or "inf",
            audio=audio,
        )

    def _new_vad(self, now_ms: int) -> EnergyVad | None:
        detection = self._turn_detection
        if detection is None:
            return None
        vad = EnergyVad(
            self._format.rate,
            detection.threshold,
            detection.prefix_padding_ms,
            detection.silence_duration_ms,
        )
        vad.reset(now_ms)
        return vad

    def _update(self, patch: wire.SessionPatch) -> None:
        """Check the whole patch first, then apply it: a refused update changes nothing."""
        if patch.type is not UNSET and patch.type != self.kind:
            raise invalid(
                f"this is a {self.kind} session; session.type cannot become {patch.type!r}",
                "session.type",
            )
        model = self._model
        if patch.model is not UNSET and self.kind == "realtime":
            model = check_model(self._settings, patch.model)
        modalities = patch.output_modalities
        if modalities is not UNSET and list(modalities) != ["text"]:
            raise invalid(
                "this model answers in text only: set output_modalities to [\"text\"]",
                "session.output_modalities",
                "unsupported_value",
            )
        if patch.include not in (UNSET, None) and patch.include:
            raise invalid(
                "log probabilities are not returned by this server; leave "
                f"{LOGPROBS!r} out of include",
                "session.include",
                "unsupported_value",
            )
        max_tokens = self._max_output_tokens
        if patch.max_output_tokens is not UNSET:
            max_tokens = self._max_tokens(patch.max_output_tokens, "session.max_output_tokens")
        fmt, transcription, detection = self._format, self._transcription, self._turn_detection
        audio = patch.audio
        audio_input = audio.input if audio is not UNSET else UNSET
        if audio_input is not UNSET:
            if audio_input.format is not UNSET:
                fmt = input_format(audio_input.format.type, audio_input.format.rate)
                if fmt != self._format and self._buffered:
                    raise invalid(
                        "the input format cannot change while the buffer holds audio; "
                        "commit or clear it first",
                        "session.audio.input.format",
                    )
            if audio_input.transcription is not UNSET:
                transcription = self._transcription_config(audio_input.transcription)
            if audio_input.turn_detection is not UNSET:
                detection = self._detection(audio_input.turn_detection)
        if audio is not UNSET and audio.output is not UNSET and audio.output.format:
            raise invalid(
                "this model writes no audio: leave session.audio.output out",
                "session.audio.output",
                "unsupported_value",
            )
        self._model = model
        if patch.instructions is not UNSET:
            self._instructions = patch.instructions
        self._max_output_tokens = max_tokens
        restart_vad = fmt != self._format or detection != self._turn_detection
        self._format, self._transcription, self._turn_detection = fmt, transcription, detection
        if restart_vad:
            self._vad = self._new_vad(self._ms(self._written))

    def _transcription_config(
        self, patch: wire.TranscriptionPatch | None
    ) -> wire.TranscriptionConfig | None:
        if patch is None:
            if self.kind == "transcription":
                raise invalid(
                    "a transcription session needs audio.input.transcription",
                    "session.audio.input.transcription",
                )
            return None
        model = patch.model or self._settings.model_name
        check_model(self._settings, model)
        # The same checks as /v1/audio/transcriptions (language code, prompt).
        TranscriptionOptions.from_fields(
            "transcribe", model=model, language=patch.language, prompt=patch.prompt
        )
        return wire.TranscriptionConfig(model=model, language=patch.language, prompt=patch.prompt)

    def _detection(self, patch: wire.TurnDetectionPatch | None) -> wire.TurnDetection | None:
        if patch is None:
            return None
        param = "session.audio.input.turn_detection"
        if patch.type != "server_vad":
            raise invalid(
                f"turn detection {patch.type!r} is not supported; use server_vad or null",
                f"{param}.type",
                "unsupported_value",
            )
        base = self._turn_detection or wire.TurnDetection()
        changes = {
            name: value
            for name in (
                "threshold",
                "prefix_padding_ms",
                "silence_duration_ms",
                "create_response",
                "interrupt_response",
            )
            if (value := getattr(patch, name)) is not UNSET
        }
        detection = msgspec.structs.replace(base, **changes)
        if not 0.0 <= detection.threshold <= 1.0:
            raise invalid("threshold must be between 0 and 1", f"{param}.threshold")
        for name in ("prefix_padding_ms", "silence_duration_ms"):
            if not 0 <= getattr(detection, name) <= 10_000:
                raise invalid(f"{name} must be between 0 and 10000", f"{param}.{name}")
        return detection

    def _max_tokens(self, value: int | str | None, param: str) -> int | None:
        if value is None or value == "inf":
            return None
        if isinstance(value, int) and 1 <= value <= self._settings.max_tokens_limit:
            return value
        raise invalid(
            f"max_output_tokens must be 'inf' or an integer from 1 to "
            f"{self._settings.max_tokens_limit}",
            param,
        )

    # ------------------------------------------------------------ client events

    async def handle(self, raw: str | bytes) -> None:
        """One client message. A bad one gets an error event and the session goes on;
        a passed limit raises ``SessionLimitError`` for the route to close the socket."""
        client_event: str | None = None
        try:
            head = self._decode(wire.HEAD_DECODER, raw, None)
            assert isinstance(head, wire.EventHead)
            client_event = head.event_id
            decoder = wire.CLIENT_DECODERS.get(head.type)
            if decoder is None:
                raise invalid(
                    f"Invalid value: {head.type!r}. Supported client events: "
                    + ", ".join(wire.CLIENT_EVENTS),
                    "type",
                )
            await self._dispatch(head.type, self._decode(decoder, raw, head.type))
        except SessionLimitError:
            raise
        except APIError as error:
            await self.handle_error(error, client_event)

    async def handle_error(self, error: APIError, client_event: str | None = None) -> None:
        await self._emit(wire.ErrorEvent(error=error_detail(error, client_event)))

    @staticmethod
    def _decode(decoder: msgspec.json.Decoder, raw: str | bytes, kind: str | None) -> object:
        try:
            return decoder.decode(raw)
        except msgspec.ValidationError as exc:
            message, _, path = str(exc).rpartition(" - at `")
            param = path.rstrip("`").removeprefix("$.") if path else None
            raise invalid(
                f"{message or exc} (in the {kind or 'client'} event)", param or None
            ) from None
        except msgspec.DecodeError as exc:
            raise invalid(
                f"the message is not valid JSON ({exc}); send each event as one JSON object",
                None,
                "invalid_json",
            ) from None

    async def _dispatch(self, kind: str, event: object) -> None:
        if isinstance(event, wire.SessionUpdateEvent):
            self._update(event.session)
            await self._emit(wire.SessionUpdated(session=self.wire_session()))
        elif isinstance(event, wire.AppendEvent):
            await self._append(event.audio)
        elif kind == "input_audio_buffer.commit":
            await self._commit_by_hand()
        elif kind == "input_audio_buffer.clear":
            self._clear_buffer()
            await self._emit(wire.BufferCleared())
        elif isinstance(event, wire.ItemCreateEvent):
            await self._create_item(event)
        elif isinstance(event, wire.ResponseCreateEvent):
            self._start_response(event.response)
        elif isinstance(event, wire.ResponseCancelEvent):
            await self._cancel_response(event.response_id)

    # ------------------------------------------------------------ input audio

    def _ms(self, samples: int) -> int:
        return samples * 1000 // self._format.rate

    def _sample(self, ms: int) -> int:
        return ms * self._format.rate // 1000

    def _room_bytes(self) -> int:
        limit = int(self._settings.realtime_max_buffer_seconds * self._format.rate)
        return max(0, limit - self._buffered) * self._format.bytes_per_input_sample

    async def _append(self, audio: str) -> None:
        room = self._room_bytes()
        try:
            samples = decode_chunk(audio, self._format, room)
        except APIError as error:
            if error.code == "input_audio_buffer_too_large":
                raise self._buffer_full() from None
            raise
        if self._buffered + samples.shape[0] > self._settings.realtime_max_buffer_seconds * (
            self._format.rate
        ):
            raise self._buffer_full()
        self._buffer.append(samples)
        self._buffered += samples.shape[0]
        self._written += samples.shape[0]
        if self._vad is not None:
            for vad_event in self._vad.push(samples):
                if isinstance(vad_event, SpeechStart):
                    await self._speech_started(vad_event.start_ms)
                elif isinstance(vad_event, SpeechStop):
                    await self._speech_stopped(vad_event.end_ms)
            if not self._vad.in_speech:
                # Outside speech only the prefix padding can still be needed (before loud
                # frames that may yet start speech).
                detection = self._turn_detection
                padding = detection.prefix_padding_ms if detection else 0
                keep = self._sample(padding + MIN_SPEECH_MS + FRAME_MS)
                self._drop_before(max(self._buffer_start, self._written - keep))

    def _buffer_full(self) -> SessionLimitError:
        return SessionLimitError(
            "the input audio buffer is full: it holds at most "
            f"{self._settings.realtime_max_buffer_seconds:g} s "
            "(--realtime-max-buffer-seconds); commit sooner or let server VAD end turns",
            param="audio",
            code="input_audio_buffer_too_large",
        )

    def _take(self, start: int, end: int) -> np.ndarray:
        """Samples [start, end) of the session (indices since it began) from the buffer."""
        joined = np.concatenate(self._buffer) if self._buffer else np.zeros(0, np.int16)
        return joined[start - self._buffer_start : end - self._buffer_start]

    def _drop_before(self, index: int) -> None:
        if index <= self._buffer_start:
            return
        joined = np.concatenate(self._buffer) if self._buffer else np.zeros(0, np.int16)
        rest = joined[index - self._buffer_start :]
        self._buffer = [rest] if rest.size else []
        self._buffered = int(rest.shape[0])
        self._buffer_start = index

    def _clear_buffer(self) -> None:
        self._drop_before(self._written)
        if self._vad is not None:
            self._vad.reset(self._ms(self._written))
        self._speech_item = None

    async def _speech_started(self, start_ms: int) -> None:
        self._speech_item = wire.new_id("item")
        self._drop_before(max(self._buffer_start, self._sample(start_ms)))
        await self._emit(wire.SpeechStarted(audio_start_ms=start_ms, item_id=self._speech_item))
        detection = self._turn_detection
        if detection and detection.interrupt_response and self._response is not None:
            await self._cancel_response(None, reason="turn_detected", quiet=True)

    async def _speech_stopped(self, end_ms: int) -> None:
        item_id = self._speech_item or wire.new_id("item")
        self._speech_item = None
        await self._emit(wire.SpeechStopped(audio_end_ms=end_ms, item_id=item_id))
        end = self._sample(end_ms)
        samples = self._take(self._buffer_start, end)
        self._drop_before(end)
        await self._commit(samples, item_id)
        detection = self._turn_detection
        if self.kind == "realtime" and detection and detection.create_response:
            if self._response is None:
                self._start_response(wire.ResponseParams())

    async def _commit_by_hand(self) -> None:
        buffered_ms = self._ms(self._buffered)
        if buffered_ms < MIN_COMMIT_MS:
            raise invalid(
                f"buffer too small: expected at least {MIN_COMMIT_MS} ms of audio, but the "
                f"buffer holds {buffered_ms} ms",
                None,
                "input_audio_buffer_commit_empty",
            )
        samples = self._take(self._buffer_start, self._written)
        item_id = self._speech_item or wire.new_id("item")
        self._clear_buffer()
        await self._commit(samples, item_id)

    async def _commit(self, samples: np.ndarray, item_id: str) -> None:
        previous = self._items[-1].id if self._items else None
        self._check_item_room()
        await self._emit(wire.BufferCommitted(item_id=item_id, previous_item_id=previous))
        part = wire.ContentPart(type="input_audio", transcript=None)
        item = Item(item_id, "user", [part])
        data = wav(samples, self._format.rate)
        if self.kind == "realtime":
            # The same intake (and feature cache) as chat completions' audio.
            item.audio[0] = self._decode_audio(data)
        self._items.append(item)
        await self._emit(wire.ItemAdded(item=item.wire(), previous_item_id=previous))
        if self._transcription is not None:
            self._spawn(self._transcribe(item, previous, data))
        else:
            await self._emit(wire.ItemDone(item=item.wire(), previous_item_id=previous))

    def _decode_audio(self, data: bytes) -> asyncio.Task[PreparedAudio]:
        """Features of a turn's audio, decoded now; a response awaits them (and reports
        a decode error), so one that is never used must not log an unread exception."""
        task = asyncio.ensure_future(self._runtime.intake.from_bytes(data, "wav"))
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        return task

    def _check_item_room(self) -> None:
        limit = self._settings.max_messages
        if limit and len(self._items) >= limit:
            raise SessionLimitError(
                f"the conversation holds {limit} items, the most a session may "
                "(--max-messages); start a new session",
                code="conversation_too_long",
            )

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _transcribe(self, item: Item, previous: str | None, data: bytes) -> None:
        """The committed turn through /v1/audio/transcriptions' own service."""
        config = self._transcription
        assert config is not None
        handles: list[GenerationHandle] = []
        text = ""
        try:
            options = TranscriptionOptions.from_fields(
                "transcribe",
                model=config.model or self._settings.model_name,
                language=config.language,
                prompt=config.prompt,
                stream=True,
            )
            prepared = await self._transcriber.prepare_bytes(options, data, "wav", param="audio")
            handles = self._transcriber.submit(prepared)
            tally = TokenTally()
            async for piece in self._transcriber.pieces(prepared, handles, tally):
                if piece:
                    text += piece
                    await self._emit(
                        wire.TranscriptionDelta(item_id=item.id, content_index=0, delta=piece)
                    )
            usage = self._transcriber.usage(prepared, tally)
            item.parts[0] = msgspec.structs.replace(item.parts[0], transcript=text)
            await self._emit(
                wire.TranscriptionCompleted(
                    item_id=item.id,
                    content_index=0,
                    transcript=text,
                    usage=wire.TranscriptionUsage(
                        input_tokens=usage.input_tokens,
                        output_tokens=usage.output_tokens,
                        total_tokens=usage.total_tokens,
                    ),
                )
            )
        except APIError as error:
            await self._emit(
                wire.TranscriptionFailed(
                    item_id=item.id, content_index=0, error=error_detail(error)
                )
            )
        finally:
            for handle in handles:
                handle.cancel()
        await self._emit(wire.ItemDone(item=item.wire(), previous_item_id=previous))

    # ------------------------------------------------------------ conversation items

    async def _create_item(self, event: wire.ItemCreateEvent) -> None:
        if self.kind != "realtime":
            raise invalid(
                "transcription sessions have no conversation: send input audio",
                "type",
            )
        source = event.item
        item = Item(source.id or wire.new_id("item"), source.role, [])
        for index, part in enumerate(source.content):
            param = f"item.content[{index}]"
            allowed = ("input_text", "input_audio") if source.role == "user" else (
                ("output_text", "text") if source.role == "assistant" else ("input_text",)
            )
            if part.type not in allowed:
                raise invalid(
                    f"{source.role} items may hold {', '.join(allowed)} parts, not {part.type!r}",
                    f"{param}.type",
                )
            if part.type == "input_audio":
                samples = decode_chunk(part.audio or "", self._format, self._room_bytes())
                data = wav(samples, self._format.rate)
                item.audio[index] = self._decode_audio(data)
                item.parts.append(wire.ContentPart(type="input_audio", transcript=part.transcript))
            else:
                item.parts.append(wire.ContentPart(type=part.type, text=part.text or ""))
        previous = self._items[-1].id if self._items else None
        if event.previous_item_id not in (None, previous):
            raise invalid(
                "items can only be added at the end of the conversation here; leave "
                "previous_item_id out or give the last item's id",
                "previous_item_id",
            )
        self._check_item_room()
        self._items.append(item)
        await self._emit(wire.ItemAdded(item=item.wire(), previous_item_id=previous))
        await self._emit(wire.ItemDone(item=item.wire(), previous_item_id=previous))

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

    # ------------------------------------------------------------ responses

    def _start_response(self, params: wire.ResponseParams) -> None:
        if self.kind != "realtime":
            raise invalid("transcription sessions write no responses", "type")
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
        max_tokens = self._max_output_tokens
        if params.max_output_tokens is not None:
            max_tokens = self._max_tokens(params.max_output_tokens, "response.max_output_tokens")
        instructions = params.instructions if params.instructions is not None else (
            self._instructions
        )
        temperature = params.temperature
        if temperature is not None and not 0.0 <= temperature <= 2.0:
            raise invalid("temperature must be between 0 and 2", "response.temperature")
        response_id = wire.new_id("resp")
        task = asyncio.ensure_future(
            self._respond(response_id, instructions, max_tokens, temperature)
        )
        self._response = ActiveResponse(response_id, task)

    async def _cancel_response(
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
        instructions: str | None,
        max_tokens: int | None,
        temperature: float | None,
    ) -> GenerationRequest:
        messages, audio = await self._messages(instructions)

        async def load(part: InputAudioPart | AudioURLPart) -> PreparedAudio:
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
            model=self._model, messages=[], max_tokens=max_tokens, temperature=temperature
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
                response_id, instructions, max_tokens, temperature
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

    # ------------------------------------------------------------ life cycle

    async def close(self) -> None:
        """Cancel every task (their engine rows are freed as they unwind)."""
        tasks = set(self._tasks)
        if self._response is not None:
            tasks.add(self._response.task)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for item in self._items:
            for decode in item.audio.values():
                decode.cancel()


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

"""One realtime session without a web framework: client events in, server events out.

The route hands every client message to ``RealtimeSession.handle`` and sends what the
session passes to ``emit``. State: the session's settings, the input audio buffer
(int16 samples in the input format), the server VAD, the conversation's items, and the
tasks that transcribe committed audio; responses are written by ``responses.Responder``.
Work that waits on the engine runs in tasks, so events keep being read while it runs
(``response.cancel``, more audio); ``close`` cancels them all, which frees their rows.

A committed turn becomes the WAV file a client would upload, and goes through the same
path as /v1/audio/transcriptions (``TranscriptionService``) or, in a conversation, the
same audio intake as chat completions' audio.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Literal

import msgspec
import numpy as np
from msgspec import UNSET

from oai_audio_server.audio.types import PreparedAudio
from oai_audio_server.chat.service import check_model
from oai_audio_server.engine.types import (
    GenerationHandle,
)
from oai_audio_server.errors import APIError
from oai_audio_server.realtime import protocol as wire
from oai_audio_server.realtime.audio_format import (
    decode_chunk,
    input_format,
    wav,
)
from oai_audio_server.realtime.errors import SessionLimitError, error_detail, invalid
from oai_audio_server.realtime.responses import Item, Responder, output_tokens
from oai_audio_server.realtime.vad import (
    FRAME_MS,
    MIN_SPEECH_MS,
    EnergyVad,
    SpeechStart,
    SpeechStop,
)
from oai_audio_server.runtime import Runtime
from oai_audio_server.settings import Settings
from oai_audio_server.transcription.protocol import TranscriptionOptions
from oai_audio_server.transcription.service import TokenTally, TranscriptionService

Kind = Literal["realtime", "transcription"]
Emit = Callable[[wire.ServerEvent], Awaitable[None]]
MIN_COMMIT_MS = 100  # OpenAI refuses shorter commits with the same code
LOGPROBS = "item.input_audio_transcription.logprobs"
TRANSCRIPTIONS_IN_FLIGHT = 4


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
        self._responder = Responder(
            settings, runtime, self._items, emit, wire.new_id("conv")
        )

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

    def _max_tokens(self, value: int | str | None, param: str) -> int | None:
        return output_tokens(value, param, self._settings)

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
            await self._start_response(event.response)
        elif isinstance(event, wire.ResponseCancelEvent):
            await self._responder.cancel(event.response_id)
        elif kind == "conversation.item.retrieve":
            assert isinstance(event, wire.ItemIdEvent)
            item = self._items[self._find(event.item_id, "Error retrieving item", "retrieve")]
            await self._emit(wire.ItemRetrieved(item=item.wire()))
        elif kind == "conversation.item.delete":
            assert isinstance(event, wire.ItemIdEvent)
            # Gone from the history every later response is built from. A response
            # already running keeps the prompt it was built with.
            del self._items[self._find(event.item_id, "Error deleting item", "delete")]
            await self._emit(wire.ItemDeleted(item_id=event.item_id))
        elif isinstance(event, wire.ItemTruncateEvent):
            self._find(event.item_id, "Error truncating item", "truncate")
            # OpenAI truncates only the audio of its own spoken answers; this model
            # writes text, so no item here has audio to truncate.
            raise invalid(
                "Only model output audio messages can be truncated; this server answers in "
                "text only, so no item has output audio (to drop an answer from the "
                "history, use conversation.item.delete)",
                "item_id",
                "unsupported_content_type",
            )

    def _find(self, item_id: str, what: str, action: str) -> int:
        """The index of ``item_id`` in the conversation, or OpenAI's error for ``action``."""
        for index, item in enumerate(self._items):
            if item.id == item_id:
                return index
        raise invalid(
            f"{what}: the item with id {item_id!r} does not exist.",
            "item_id",
            f"item_{action}_invalid_item_id",
        )

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
        if detection and detection.interrupt_response and self._responder.active:
            await self._responder.cancel(None, reason="turn_detected", quiet=True)

    async def _speech_stopped(self, end_ms: int) -> None:
        item_id = self._speech_item or wire.new_id("item")
        self._speech_item = None
        await self._emit(wire.SpeechStopped(audio_end_ms=end_ms, item_id=item_id))
        end = self._sample(end_ms)
        samples = self._take(self._buffer_start, end)
        self._drop_before(end)
        try:
            self._check_turn_room(samples.shape[0])
        except SessionLimitError:
            raise
        except APIError as error:  # the turn is dropped; the client is told why
            await self.handle_error(error)
            return
        await self._commit(samples, item_id)
        detection = self._turn_detection
        if self.kind == "realtime" and detection and detection.create_response:
            if not self._responder.active:
                await self._start_response(wire.ResponseParams())

    async def _commit_by_hand(self) -> None:
        buffered_ms = self._ms(self._buffered)
        if buffered_ms < MIN_COMMIT_MS:
            raise invalid(
                f"buffer too small: expected at least {MIN_COMMIT_MS} ms of audio, but the "
                f"buffer holds {buffered_ms} ms",
                None,
                "input_audio_buffer_commit_empty",
            )
        self._check_turn_room(self._buffered)  # refused: the buffer stays as it is
        samples = self._take(self._buffer_start, self._written)
        item_id = self._speech_item or wire.new_id("item")
        self._clear_buffer()
        await self._commit(samples, item_id)

    def _check_turn_room(self, samples: int) -> None:
        self._check_item_room()
        if self.kind == "realtime":  # a transcription session keeps no audio
            self._check_conversation_room(samples / self._format.rate, 1, 0)

    async def _commit(self, samples: np.ndarray, item_id: str) -> None:
        if self._transcription is not None:
            # At most TRANSCRIPTIONS_IN_FLIGHT turns of a session are transcribed at
            # once (each holds an engine row); past that the session stops reading
            # events until one is done, so a client that commits faster than they are
            # transcribed is slowed down over TCP instead of filling the batch.
            while len(self._tasks) >= TRANSCRIPTIONS_IN_FLIGHT:
                await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)
        previous = self._items[-1].id if self._items else None
        await self._emit(wire.BufferCommitted(item_id=item_id, previous_item_id=previous))
        part = wire.ContentPart(type="input_audio", transcript=None)
        item = Item(item_id, "user", [part], seconds=samples.shape[0] / self._format.rate)
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
        if source.id is not None and any(item.id == source.id for item in self._items):
            raise invalid(
                f"the conversation already holds an item with id {source.id!r}; give a new "
                "id or leave it out",
                "item.id",
            )
        # OpenAI's placement: absent (or "") appends, "root" puts the item first, an id
        # puts it right after that item.
        after = event.previous_item_id or None
        if after is None:
            index = len(self._items)
        elif after == "root":
            index = 0
        else:
            found = [i for i, item in enumerate(self._items) if item.id == after]
            if not found:
                raise invalid(
                    f"Error adding item: the previous item with id {after!r} does not exist.",
                    "previous_item_id",
                    "item_create_invalid_previous_item_id",
                )
            index = found[0] + 1
        item = self._build_item(source, "item")
        try:
            self._check_item_room()
            self._check_conversation_room(item.seconds, item.audio_count, item.text_chars)
        except APIError:
            item.discard()
            raise
        previous = self._items[index - 1].id if index else None
        self._items.insert(index, item)
        await self._emit(wire.ItemAdded(item=item.wire(), previous_item_id=previous))
        await self._emit(wire.ItemDone(item=item.wire(), previous_item_id=previous))

    def _build_item(self, source: wire.MessageItem, param: str) -> Item:
        """A message item sent by the client (its audio decoding in the background)."""
        item = Item(source.id or wire.new_id("item"), source.role, [])
        try:
            self._read_parts(item, source, param)
        except APIError:
            item.discard()
            raise
        return item

    def _read_parts(self, item: Item, source: wire.MessageItem, param: str) -> None:
        for index, part in enumerate(source.content):
            part_param = f"{param}.content[{index}]"
            allowed = ("input_text", "input_audio") if source.role == "user" else (
                ("output_text", "text") if source.role == "assistant" else ("input_text",)
            )
            if part.type not in allowed:
                raise invalid(
                    f"{source.role} items may hold {', '.join(allowed)} parts, not {part.type!r}",
                    f"{part_param}.type",
                )
            if part.type == "input_audio":
                samples = decode_chunk(part.audio or "", self._format, self._room_bytes())
                if samples.shape[0] < self._sample(MIN_COMMIT_MS):
                    raise invalid(
                        f"an input_audio part needs at least {MIN_COMMIT_MS} ms of audio in "
                        "the session's input format",
                        f"{part_param}.audio",
                    )
                item.seconds += samples.shape[0] / self._format.rate
                item.audio[index] = self._decode_audio(wav(samples, self._format.rate))
                item.parts.append(wire.ContentPart(type="input_audio", transcript=part.transcript))
            else:
                item.parts.append(wire.ContentPart(type=part.type, text=part.text or ""))

    def _check_conversation_room(self, seconds: float, audios: int, chars: int) -> None:
        """What the default conversation may hold: every response's prompt is built from
        all of it, so a response could not use more audio than one chat request may send
        (--max-audio-seconds, --max-audios-per-request), nor more text than a request
        body holds (--max-body-bytes). Refused before it is kept, so that no session can
        pile up memory its responses could never use; the error says how to make room."""
        settings = self._settings
        held_seconds = sum(item.seconds for item in self._items)
        held_audios = sum(item.audio_count for item in self._items)
        held_chars = sum(item.text_chars for item in self._items)
        fix = "delete older items (conversation.item.delete) or start a new session"
        if seconds and held_seconds + seconds > settings.max_audio_seconds:
            raise invalid(
                f"the conversation holds {held_seconds:.1f} s of audio; {seconds:.1f} s more "
                f"would pass this server's limit of {settings.max_audio_seconds:g} s "
                f"(--max-audio-seconds) for one response's prompt: {fix}",
                None,
                "audio_too_long",
            )
        if audios and held_audios + audios > settings.max_audios_per_request:
            raise invalid(
                f"the conversation holds {held_audios} audio items, the most one response's "
                f"prompt may (--max-audios-per-request): {fix}",
                None,
                "too_many_audio_items",
            )
        if chars and held_chars + chars > settings.max_body_bytes:
            raise invalid(
                f"the conversation's text would pass {settings.max_body_bytes} characters, "
                f"the most one chat request may send (--max-body-bytes): {fix}",
                None,
                "conversation_too_long",
            )

    # ------------------------------------------------------------ life cycle

    async def _start_response(self, params: wire.ResponseParams) -> None:
        if self.kind != "realtime":
            raise invalid("transcription sessions write no responses", "type")
        context = None
        if params.input is not None:
            # A context of its own: the items given inline (kept only for this response)
            # and references to items of the session, looked up now.
            context = []
            for index, entry in enumerate(params.input):
                param = f"response.input[{index}]"
                if isinstance(entry, wire.ItemReference):
                    found = [item for item in self._items if item.id == entry.id]
                    if not found:
                        raise invalid(
                            f"the item with id {entry.id!r} does not exist in this session",
                            f"{param}.id",
                        )
                    context.append(found[0])
                else:
                    context.append(self._build_item(entry.as_item(), param))
        await self._responder.start(
            params, self._model, self._instructions, self._max_output_tokens, context
        )

    async def close(self) -> None:
        """Cancel every task (their engine rows are freed as they unwind)."""
        await self._responder.close()
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for item in self._items:
            for decode in item.audio.values():
                decode.cancel()

"""Chat completions without HTTP: a request in, a ChatCompletion or SSE chunks out."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from msgspec import UNSET, UnsetType

from oai_audio_server.audio.intake import AudioIntake
from oai_audio_server.audio.types import PreparedAudio
from oai_audio_server.chat.messages import AudioBudget, to_conversation
from oai_audio_server.chat.observer import GenerationObserver
from oai_audio_server.chat.unsupported import reject_unsupported
from oai_audio_server.engine.loader import ModelBundle, room_after_prompt
from oai_audio_server.engine.types import (
    Failed,
    Finished,
    GenerationHandle,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)
from oai_audio_server.errors import (
    APIError,
    ContextLengthExceededError,
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
)
from oai_audio_server.protocol import (
    AssistantMessage,
    AudioURLPart,
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    FinishReason,
    InputAudioPart,
    PromptTokensDetails,
    Usage,
    json_encoder,
)
from oai_audio_server.qwen.conversation import Conversation
from oai_audio_server.qwen.prompt import Prompt
from oai_audio_server.runtime import Runtime
from oai_audio_server.settings import Settings, limit_name
from oai_audio_server.sse import DONE, KEEPALIVE, next_events, sse_event

MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class PreparedGeneration:
    """A validated request, ready for the engine."""

    generation: GenerationRequest
    prompt: Prompt
    model_name: str

    @property
    def audio_seconds(self) -> float:
        return sum(s.end_seconds - s.start_seconds for s in self.prompt.audio_segments)


def check_model(settings: Settings, requested: str) -> str:
    if requested not in settings.served_names:
        raise ModelNotFoundError(
            f"the model '{requested}' does not exist; this server serves "
            + ", ".join(f"'{name}'" for name in settings.served_names),
            param="model",
        )
    return requested


def sampling_params(
    request: ChatCompletionRequest, bundle: ModelBundle, settings: Settings, prompt_len: int
) -> SamplingParams:
    defaults = bundle.defaults
    room = room_after_prompt(
        bundle,
        prompt_len,
        param="messages",
        fix="send shorter audio, fewer audio items or less text",
    )
    asked = request.max_completion_tokens or request.max_tokens
    param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
    if asked is not None and asked > settings.max_tokens_limit:
        raise InvalidRequestError(
            f"{param} is {asked}; this server allows at most {settings.max_tokens_limit} "
            f"({limit_name('max_tokens_limit')}); send a smaller {param}, or leave it out",
            param=param,
        )
    if asked is not None and asked > room:
        raise ContextLengthExceededError(
            f"the prompt ({prompt_len} tokens) plus {param} ({asked}) exceeds the model's "
            f"{bundle.max_model_len}-token context; ask for at most {room}",
            param=param,
        )
    max_tokens = asked or min(defaults.max_new_tokens, settings.max_tokens_limit, room)

    stop = request.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequestError(
            f"at most {MAX_STOP_STRINGS} stop strings are allowed", param="stop"
        )
    if request.temperature is not None:
        temperature = request.temperature
    else:
        temperature = defaults.temperature if defaults.do_sample else 0.0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=request.top_p if request.top_p is not None else defaults.top_p,
        top_k=request.top_k if request.top_k is not None else defaults.top_k,
        repetition_penalty=(
            request.repetition_penalty
            if request.repetition_penalty is not None
            else defaults.repetition_penalty
        ),
        seed=request.seed,
        stop=tuple(s for s in stops if s),
    )


def text_interval(settings: Settings, stream: bool) -> float:
    """How often the engine hands over text after the first (which always goes at once,
    for the time-to-first-token metric): a stream every --stream-interval-ms, a whole
    answer the rest at the end."""
    return settings.stream_interval_ms / 1000 if stream else math.inf


PayloadResolver = Callable[[str], "str | memoryview"]


def _as_sent(value: str) -> str | memoryview:
    return value


class ChatService:
    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        self._settings = settings
        self._runtime = runtime

    async def conversation(
        self, request: ChatCompletionRequest, payload: PayloadResolver = _as_sent
    ) -> Conversation:
        limit = self._settings.max_messages
        if limit and len(request.messages) > limit:
            # Each message costs Python objects and time on the event loop; a window of a
            # few thousand tokens keeps a few hundred turns at most.
            raise InvalidRequestError(
                f"Invalid 'messages': array too long. Expected at most {limit} messages "
                f"({limit_name('max_messages')}), got {len(request.messages)}; send the "
                "recent part of "
                "the conversation (older turns cannot fit the model's window anyway)",
                param="messages",
                code="array_above_max_length",
            )
        intake: AudioIntake = self._runtime.intake

        async def load_audio(part: InputAudioPart | AudioURLPart) -> PreparedAudio:
            if isinstance(part, InputAudioPart):
                data = payload(part.input_audio.data)
                return await intake.from_base64(data, part.input_audio.format)
            return await intake.from_url(payload(part.audio_url.url))

        budget = AudioBudget(
            max_items=self._settings.max_audios_per_request,
            max_seconds=self._settings.max_audio_seconds,
        )
        return await to_conversation(request.messages, load_audio, budget)

    async def prepare(
        self, request: ChatCompletionRequest, payload: PayloadResolver = _as_sent
    ) -> PreparedGeneration:
        """``payload`` gives the bytes behind an audio string that the body reader cut
        out of the JSON (see ``http.long_strings``)."""
        model_name = check_model(self._settings, request.model)
        reject_unsupported(request)
        bundle = self._runtime.bundle
        conversation = await self.conversation(request, payload)
        # Tokenising takes time in proportion to the text: off the event loop.
        prompt = await self._runtime.offload(self._runtime.prompt_builder.build, conversation)
        sampling = sampling_params(request, bundle, self._settings, len(prompt.token_ids))
        generation = GenerationRequest(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            prompt_ids=prompt.token_ids,
            audio=prompt.audio_segments,
            sampling=sampling,
            deadline=time.monotonic() + self._settings.request_timeout,
            text_interval=text_interval(self._settings, bool(request.stream)),
        )
        return PreparedGeneration(generation, prompt, model_name)

    def _usage(self, prepared: PreparedGeneration, finished: Finished) -> Usage:
        return Usage(
            prompt_tokens=finished.prompt_tokens,
            completion_tokens=finished.completion_tokens,
            total_tokens=finished.prompt_tokens + finished.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(
                audio_tokens=prepared.prompt.audio_token_count,
                cached_tokens=finished.cached_tokens,
            ),
        )

    async def complete(
        self, prepared: PreparedGeneration, observer: GenerationObserver | None = None
    ) -> ChatCompletion:
        handle = self._runtime.submit(prepared.generation)
        parts: list[str] = []
        try:
            while True:
                event = await handle.next_event()
                if isinstance(event, TextDelta):
                    if observer is not None and not parts:
                        observer.first_token()
                    parts.append(event.text)
                elif isinstance(event, Failed):
                    raise event.error
                else:
                    break
        finally:
            handle.cancel()  # a no-op once finished; stops the row if we were cancelled
        usage = self._usage(prepared, event)
        if observer is not None:
            observer.finished(usage, prepared.audio_seconds)
        return ChatCompletion(
            id=prepared.generation.request_id,
            created=int(time.time()),
            model=prepared.model_name,
            choices=[
                ChatCompletionChoice(
                    index=0,
                    message=AssistantMessage(content="".join(parts)),
                    finish_reason=event.reason,
                )
            ],
            usage=usage,
        )

    def submit(self, prepared: PreparedGeneration) -> GenerationHandle:
        """Queue the request now, so a full queue is a 429 before the stream starts."""
        return self._runtime.submit(prepared.generation)

    async def stream(
        self,
        prepared: PreparedGeneration,
        handle: GenerationHandle,
        *,
        include_usage: bool,
        observer: GenerationObserver | None = None,
    ) -> AsyncIterator[bytes]:
        """Server-sent events; an error after the stream started is a final error event."""
        created = int(time.time())
        # OpenAI sends "usage": null on every chunk when usage was asked for.
        usage: Usage | None | UnsetType = None if include_usage else UNSET

        def chunk(delta: ChunkDelta, finish_reason: FinishReason | None = None) -> bytes:
            body = ChatCompletionChunk(
                id=prepared.generation.request_id,
                created=created,
                model=prepared.model_name,
                choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)],
                usage=usage,
            )
            return sse_event(json_encoder.encode(body))

        first = True
        try:
            yield chunk(ChunkDelta(role="assistant", content=""))
            done = False
            while not done:
                events = await next_events(handle)
                if events is None:
                    yield KEEPALIVE
                    continue
                # What arrived together goes out in one write: the last text, the
                # finish chunk, usage and [DONE] cost one send, not four.
                frames: list[bytes] = []
                for event in events:
                    if isinstance(event, TextDelta):
                        if observer is not None and first:
                            observer.first_token()
                        first = False
                        frames.append(chunk(ChunkDelta(content=event.text)))
                        continue
                    done = True
                    if isinstance(event, Failed):
                        if observer is not None:
                            observer.failed(event.error)
                        frames.append(sse_event(json_encoder.encode(event.error.to_body())))
                        break
                    final_usage = self._usage(prepared, event)
                    if observer is not None:
                        observer.finished(final_usage, prepared.audio_seconds)
                    frames.append(chunk(ChunkDelta(), event.reason))
                    if include_usage:
                        usage_chunk = ChatCompletionChunk(
                            id=prepared.generation.request_id,
                            created=created,
                            model=prepared.model_name,
                            choices=[],
                            usage=final_usage,
                        )
                        frames.append(sse_event(json_encoder.encode(usage_chunk)))
                    break
                if done:
                    frames.append(DONE)
                yield b"".join(frames)
        except Exception as exc:  # never a bare broken stream
            error = exc if isinstance(exc, APIError) else EngineError(f"stream failed: {exc}")
            if observer is not None:
                observer.failed(error)
            yield sse_event(json_encoder.encode(error.to_body())) + DONE
        finally:
            handle.cancel()  # client gone or stream done: the row leaves the batch

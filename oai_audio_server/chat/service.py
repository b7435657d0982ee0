"""Chat completions without HTTP: a request in, a ChatCompletion or SSE chunks out."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from msgspec import UNSET, UnsetType

from oai_audio_server.audio.intake import AudioIntake
from oai_audio_server.audio.types import PreparedAudio
from oai_audio_server.chat.logprobs import LogprobFormatter
from oai_audio_server.chat.messages import AudioBudget, AudioPart, to_conversation
from oai_audio_server.chat.observer import GenerationObserver
from oai_audio_server.chat.options import (
    audio_file_data,
    choice_count,
    grammar_spec,
    logit_bias,
    logprob_options,
)
from oai_audio_server.chat.unsupported import reject_unsupported
from oai_audio_server.engine.loader import ModelBundle, room_after_prompt
from oai_audio_server.engine.sampling import choice_seed
from oai_audio_server.engine.types import (
    Failed,
    Finished,
    GenerationEvent,
    GenerationHandle,
    GenerationRequest,
    SamplingParams,
    TextDelta,
    TokenLogprob,
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
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    FilePart,
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
from oai_audio_server.sse import DONE, KEEPALIVE, next_choice_events, sse_event

MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class PreparedGeneration:
    """A validated request, ready for the engine: one generation per choice (``n``)."""

    generations: list[GenerationRequest]
    prompt: Prompt
    model_name: str
    request_id: str
    logprobs: bool = False
    formatter: LogprobFormatter | None = field(default=None, compare=False)

    @property
    def generation(self) -> GenerationRequest:
        return self.generations[0]

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
    wants_logprobs, top_logprobs = logprob_options(request)
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
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=logit_bias(request, bundle.vocab_limit),
        logprobs=wants_logprobs,
        top_logprobs=top_logprobs,
        grammar=grammar_spec(request),
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

        async def load_audio(part: AudioPart) -> PreparedAudio:
            if isinstance(part, InputAudioPart):
                data = payload(part.input_audio.data)
                return await intake.from_base64(data, part.input_audio.format)
            if isinstance(part, FilePart):
                return await intake.from_url(audio_file_data(payload(part.file.file_data or "")))
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
        choices = choice_count(request)
        conversation = await self.conversation(request, payload)
        # Tokenising takes time in proportion to the text: off the event loop.
        prompt = await self._runtime.offload(self._runtime.prompt_builder.build, conversation)
        sampling = sampling_params(request, bundle, self._settings, len(prompt.token_ids))
        if sampling.grammar is not None:
            # Compiled (and cached) on a worker thread now: a schema the library cannot
            # honour is a 400 before anything is queued, and the engine finds it ready.
            await self._runtime.offload(bundle.grammars.compile, sampling.grammar)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        deadline = time.monotonic() + self._settings.request_timeout
        generations = [
            GenerationRequest(
                request_id=request_id if index == 0 else f"{request_id}-{index}",
                prompt_ids=prompt.token_ids,
                audio=prompt.audio_segments,
                sampling=(sampling if index == 0 or sampling.seed is None else
                          dataclasses.replace(sampling, seed=choice_seed(sampling.seed, index))),
                deadline=deadline,
                text_interval=text_interval(self._settings, bool(request.stream)),
                same_prompt_as_previous=index > 0,  # one prefill for every choice
            )
            for index in range(choices)
        ]
        formatter = LogprobFormatter(bundle.token_bytes) if sampling.logprobs else None
        return PreparedGeneration(generations, prompt, model_name, request_id,
                                  sampling.logprobs, formatter)

    def _usage(self, prepared: PreparedGeneration, finished: Sequence[Finished]) -> Usage:
        """The prompt once, the completion tokens of every choice."""
        prompt_tokens = finished[0].prompt_tokens
        completion_tokens = sum(f.completion_tokens for f in finished)
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(
                audio_tokens=prepared.prompt.audio_token_count,
                cached_tokens=finished[0].cached_tokens,
            ),
        )

    async def complete(
        self, prepared: PreparedGeneration, observer: GenerationObserver | None = None
    ) -> ChatCompletion:
        handles = self._runtime.submit_group(prepared.generations)
        first = True

        def on_text() -> None:
            nonlocal first
            if observer is not None and first:
                observer.first_token()
            first = False

        tasks = [asyncio.ensure_future(_drain(h, on_text)) for h in handles]
        try:
            drained = await asyncio.gather(*tasks)
        finally:
            # One choice failed or the client left: the other choices stop too (a
            # cancelled row sends no more events, so their readers must not wait).
            for task in tasks:
                task.cancel()
            for handle in handles:
                handle.cancel()  # a no-op once finished; stops the rows if we were cancelled
        usage = self._usage(prepared, [finished for _, _, finished in drained])
        if observer is not None:
            observer.finished(usage, prepared.audio_seconds)
        formatter = prepared.formatter
        return ChatCompletion(
            id=prepared.request_id,
            created=int(time.time()),
            model=prepared.model_name,
            choices=[
                ChatCompletionChoice(
                    index=index,
                    message=AssistantMessage(content=text),
                    finish_reason=finished.reason,
                    logprobs=formatter.choice(logprobs) if formatter is not None else None,
                )
                for index, (text, logprobs, finished) in enumerate(drained)
            ],
            usage=usage,
        )

    def submit(self, prepared: PreparedGeneration) -> Sequence[GenerationHandle]:
        """Queue the request now, so a full queue is a 429 before the stream starts."""
        return self._runtime.submit_group(prepared.generations)

    async def stream(
        self,
        prepared: PreparedGeneration,
        handles: Sequence[GenerationHandle],
        *,
        include_usage: bool,
        observer: GenerationObserver | None = None,
    ) -> AsyncIterator[bytes]:
        """Server-sent events, each choice's chunks carrying its ``index``; an error after
        the stream started is a final error event."""
        created = int(time.time())
        # OpenAI sends "usage": null on every chunk when usage was asked for.
        usage: Usage | None | UnsetType = None if include_usage else UNSET
        formatter = prepared.formatter

        def chunk(
            index: int, delta: ChunkDelta, finish_reason: FinishReason | None = None,
            logprobs: tuple[TokenLogprob, ...] = (),
        ) -> bytes:
            body = ChatCompletionChunk(
                id=prepared.request_id,
                created=created,
                model=prepared.model_name,
                choices=[ChunkChoice(
                    index=index, delta=delta, finish_reason=finish_reason,
                    logprobs=formatter.choice(logprobs) if formatter is not None else None,
                )],
                usage=usage,
            )
            return sse_event(json_encoder.encode(body))

        first = True
        finished: dict[int, Finished] = {}
        try:
            yield b"".join(chunk(i, ChunkDelta(role="assistant", content=""))
                           for i in range(len(handles)))
            while len(finished) < len(handles):
                events = await next_choice_events(handles, finished)
                if events is None:
                    yield KEEPALIVE
                    continue
                # What arrived together goes out in one write: the last text, the
                # finish chunk, usage and [DONE] cost one send, not four.
                frames: list[bytes] = []
                failed = None
                for index, event in events:
                    if isinstance(event, TextDelta):
                        if observer is not None and first and event.text:
                            observer.first_token()
                            first = False
                        frames.append(chunk(index, ChunkDelta(content=event.text),
                                            logprobs=event.logprobs))
                    elif isinstance(event, Failed):
                        failed = event.error
                        break
                    else:
                        finished[index] = event
                        frames.append(chunk(index, ChunkDelta(), event.reason))
                if failed is not None:
                    if observer is not None:
                        observer.failed(failed)
                    frames.append(sse_event(json_encoder.encode(failed.to_body())) + DONE)
                    yield b"".join(frames)
                    return
                if len(finished) == len(handles):
                    final_usage = self._usage(prepared, [finished[i] for i in sorted(finished)])
                    if observer is not None:
                        observer.finished(final_usage, prepared.audio_seconds)
                    if include_usage:
                        usage_chunk = ChatCompletionChunk(
                            id=prepared.request_id,
                            created=created,
                            model=prepared.model_name,
                            choices=[],
                            usage=final_usage,
                        )
                        frames.append(sse_event(json_encoder.encode(usage_chunk)))
                    frames.append(DONE)
                yield b"".join(frames)
        except Exception as exc:  # never a bare broken stream
            error = exc if isinstance(exc, APIError) else EngineError(f"stream failed: {exc}")
            if observer is not None:
                observer.failed(error)
            yield sse_event(json_encoder.encode(error.to_body())) + DONE
        finally:
            for handle in handles:
                handle.cancel()  # client gone or stream done: the rows leave the batch


async def _drain(
    handle: GenerationHandle, on_text: Callable[[], None]
) -> tuple[str, list[TokenLogprob], Finished]:
    """One choice's whole answer: text, log probabilities and how it ended."""
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    while True:
        event: GenerationEvent = await handle.next_event()
        if isinstance(event, TextDelta):
            if event.text:
                on_text()
            parts.append(event.text)
            logprobs.extend(event.logprobs)
        elif isinstance(event, Failed):
            raise event.error
        else:
            return "".join(parts), logprobs, event

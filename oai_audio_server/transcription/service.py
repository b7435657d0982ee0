"""Transcriptions and translations without HTTP: audio in, a transcript or SSE events out.

Audio longer than 30 s arrives from the intake already cut into segments of at most
30 s. Every segment becomes its own one-audio prompt and generation; all are submitted
at once so the batching engine runs them side by side, and their texts are joined in
order. Each segment yields at least one timed segment in the reply, more when the
model wrote timestamp tokens.
"""

from __future__ import annotations

import time
import unicodedata
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from oai_audio_server.audio.types import AudioSegmentFeatures, PreparedAudio
from oai_audio_server.chat.observer import GenerationObserver
from oai_audio_server.chat.service import check_model, text_interval
from oai_audio_server.engine.loader import ModelBundle, room_after_prompt
from oai_audio_server.engine.types import (
    Failed,
    Finished,
    GenerationHandle,
    GenerationRequest,
    SamplingParams,
    TextDelta,
    TokenLogprob,
)
from oai_audio_server.errors import (
    APIError,
    EngineError,
    InvalidAudioError,
)
from oai_audio_server.protocol import Usage, json_encoder
from oai_audio_server.runtime import Runtime
from oai_audio_server.settings import Settings, limit_name
from oai_audio_server.sse import DONE, KEEPALIVE, next_events, sse_event
from oai_audio_server.transcription.confidence import (
    mean_logprob,
    silent_share,
    token_logprobs,
)
from oai_audio_server.transcription.formats import TimedSegment, TranscriptResult
from oai_audio_server.transcription.prompts import (
    language_name,
    segment_audio,
    task_conversation,
)
from oai_audio_server.transcription.protocol import (
    InputTokenDetails,
    TranscriptionOptions,
    TranscriptTextDeltaEvent,
    TranscriptTextDoneEvent,
    UsageTokens,
)
from oai_audio_server.transcription.timestamps import (
    TextCleaner,
    TimedSpan,
    clean_text,
    timed_spans,
)

FRAMES_PER_SECOND = 100  # Whisper's "seek" counts 10 ms mel frames


@dataclass(frozen=True)
class SegmentJob:
    """One audio segment's generation."""

    generation: GenerationRequest
    segment: AudioSegmentFeatures
    audio_tokens: int


@dataclass(frozen=True)
class PreparedTranscription:
    options: TranscriptionOptions
    audio: PreparedAudio
    jobs: tuple[SegmentJob, ...]


def _is_cjk(char: str) -> bool:
    """Scripts written without spaces between words (and so between segments)."""
    if not char:
        return False
    name = unicodedata.name(char, "")
    return name.startswith(("CJK", "HIRAGANA", "KATAKANA", "THAI", "IDEOGRAPHIC"))


def separator(left: str, right: str) -> str:
    """What goes between the texts of two consecutive audio segments."""
    if not left or not right or _is_cjk(left[-1]) or _is_cjk(right[0]):
        return ""
    return " "


@dataclass
class TokenTally:
    """Token counts of a transcript read piece by piece, and its last character (which
    decides the separator before the next segment's text)."""

    input_tokens: int = 0
    output_tokens: int = 0
    last_char: str = ""
    # Every token's log probability (when the engine was asked for them), and those of
    # the tokens whose text has not been handed out yet.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    unsent: list[TokenLogprob] = field(default_factory=list)

    def take_unsent(self) -> list[TokenLogprob]:
        taken, self.unsent = self.unsent, []
        return taken


def join_segment_texts(texts: Iterable[str]) -> str:
    joined = ""
    for text in texts:
        if text:
            joined += separator(joined, text) + text
    return joined


def _report(
    observer: GenerationObserver | None,
    prepared: PreparedTranscription,
    prompt_tokens: int,
    completion_tokens: int,
) -> None:
    if observer is None:
        return
    usage = Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
    observer.finished(usage, prepared.audio.duration_seconds)


class TranscriptionService:
    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        self._settings = settings
        self._runtime = runtime

    async def prepare_bytes(
        self,
        options: TranscriptionOptions,
        data: bytes | memoryview,
        format_hint: str | None,
        *,
        param: str,
    ) -> PreparedTranscription:
        return await self._prepare_from(
            options, lambda: self._runtime.intake.from_bytes(data, format_hint), param
        )

    async def prepare_base64(
        self,
        options: TranscriptionOptions,
        data: str | memoryview,
        format_hint: str | None,
        *,
        param: str,
    ) -> PreparedTranscription:
        return await self._prepare_from(
            options, lambda: self._runtime.intake.from_base64(data, format_hint), param
        )

    async def _prepare_from(
        self,
        options: TranscriptionOptions,
        decode: Callable[[], Awaitable[PreparedAudio]],
        param: str,
    ) -> PreparedTranscription:
        # Model name first (404), then readiness (503), before any audio is decoded.
        check_model(self._settings, options.model)
        _ = self._runtime.bundle
        try:
            audio = await decode()
        except APIError as exc:
            raise exc.with_param(param) from None
        # Building one prompt per 30 s segment tokenises text: off the event loop.
        return await self._runtime.offload(self._prepare, options, audio, param)

    def _prepare(
        self, options: TranscriptionOptions, audio: PreparedAudio, param: str
    ) -> PreparedTranscription:
        limit = self._settings.max_audio_seconds
        if audio.duration_seconds > limit:
            raise InvalidAudioError(
                f"The audio is {audio.duration_seconds:.1f} s long, over this server's limit "
                f"of {limit:g} s per request ({limit_name('max_audio_seconds')}). Send a "
                "shorter part of it, or split it over several requests.",
                param=param,
                code="audio_too_long",
            )
        bundle = self._runtime.bundle
        builder = self._runtime.prompt_builder
        deadline = time.monotonic() + self._settings.request_timeout
        request_id = f"trsc-{uuid.uuid4().hex}"
        jobs = []
        for index, segment in enumerate(audio.segments):
            conversation = task_conversation(
                options.task,
                segment_audio(audio, index),
                language=options.language,
                context=options.prompt,
            )
            prompt = builder.build(conversation)
            generation = GenerationRequest(
                request_id=f"{request_id}-{index}",
                prompt_ids=prompt.token_ids,
                audio=prompt.audio_segments,
                sampling=self._sampling(bundle, len(prompt.token_ids), options),
                deadline=deadline,
                text_interval=text_interval(self._settings, options.stream),
            )
            jobs.append(SegmentJob(generation, segment, prompt.audio_token_count))
        return PreparedTranscription(options, audio, tuple(jobs))

    def _sampling(
        self, bundle: ModelBundle, prompt_len: int, options: TranscriptionOptions
    ) -> SamplingParams:
        room = room_after_prompt(bundle, prompt_len, param="prompt", fix="send a shorter prompt")
        defaults = bundle.defaults
        return SamplingParams(
            max_tokens=min(defaults.max_new_tokens, self._settings.max_tokens_limit, room),
            temperature=options.temperature,
            top_p=defaults.top_p,
            top_k=defaults.top_k,
            repetition_penalty=defaults.repetition_penalty,
            # verbose_json's avg_logprob and include[]=logprobs read them.
            logprobs=options.response_format == "verbose_json" or options.include_logprobs,
        )

    def submit(self, prepared: PreparedTranscription) -> list[GenerationHandle]:
        """Queue every segment now, as one admission (a full queue is a 429 before any reply
        starts, and a long file never needs more free slots than a short one)."""
        return list(self._runtime.submit_group([job.generation for job in prepared.jobs]))

    async def transcribe(
        self,
        prepared: PreparedTranscription,
        handles: list[GenerationHandle],
        observer: GenerationObserver | None = None,
    ) -> TranscriptResult:
        raws: list[str] = []
        logprobs: list[list[TokenLogprob]] = []
        prompt_tokens = completion_tokens = 0
        try:
            for handle in handles:
                parts: list[str] = []
                logprobs.append([])
                while True:
                    event = await handle.next_event()
                    if isinstance(event, TextDelta):
                        if observer is not None and not raws and not parts:
                            observer.first_token()
                        parts.append(event.text)
                        logprobs[-1].extend(event.logprobs)
                    elif isinstance(event, Failed):
                        raise event.error
                    else:
                        prompt_tokens += event.prompt_tokens
                        completion_tokens += event.completion_tokens
                        break
                raws.append("".join(parts))
        finally:
            for handle in handles:
                handle.cancel()
        _report(observer, prepared, prompt_tokens, completion_tokens)
        return self.result(prepared, raws, logprobs)

    def result(
        self, prepared: PreparedTranscription, raws: list[str],
        logprobs: list[list[TokenLogprob]],
    ) -> TranscriptResult:
        """Texts and timed segments from each audio segment's raw model output, and
        the log probabilities of its tokens."""
        bundle = self._runtime.bundle
        tokenizer = bundle.tokenizer
        wants_tokens = prepared.options.response_format == "verbose_json"
        segments: list[TimedSegment] = []
        for job, raw, job_logprobs in zip(prepared.jobs, raws, logprobs, strict=True):
            audio_segment = job.segment
            length = audio_segment.end_seconds - audio_segment.start_seconds
            spans = timed_spans(raw, length) or [TimedSpan(0.0, max(length, 0.0), "")]
            average = mean_logprob(job_logprobs)
            for span in spans:
                tokens: tuple[int, ...] = ()
                if span.text and wants_tokens:  # only verbose_json shows them
                    tokens = tuple(tokenizer.encode_text(span.text))
                segments.append(
                    TimedSegment(
                        start=audio_segment.start_seconds + span.start,
                        end=audio_segment.start_seconds + span.end,
                        text=span.text,
                        tokens=tokens,
                        seek=round(audio_segment.start_seconds * FRAMES_PER_SECOND),
                        avg_logprob=average,
                        no_speech_prob=(silent_share(audio_segment.mel, span.start, span.end)
                                        if wants_tokens else 0.0),
                    )
                )
        options = prepared.options
        return TranscriptResult(
            task=options.task,
            language=self._language(options),
            duration=prepared.audio.duration_seconds,
            text=join_segment_texts(clean_text(raw) for raw in raws),
            segments=tuple(segments),
            temperature=options.temperature,
            logprobs=(tuple(token_logprobs([lp for job in logprobs for lp in job],
                                           bundle.token_bytes))
                      if options.include_logprobs else None),
        )

    @staticmethod
    def _language(options: TranscriptionOptions) -> str:
        if options.task == "translate":
            return "english"
        return language_name(options.language) if options.language else "unknown"

    async def pieces(
        self,
        prepared: PreparedTranscription,
        handles: list[GenerationHandle],
        tally: TokenTally,
        observer: GenerationObserver | None = None,
    ) -> AsyncIterator[str | None]:
        """The transcript's clean text as it is made, separators between segments
        included (so the pieces add up to ``transcribe``'s text); None after a quiet
        keep-alive period. Token counts go into ``tally``; a failed generation raises.
        The SSE stream and realtime sessions both read it."""
        text_started = False
        for handle in handles:
            cleaner = TextCleaner()
            segment_started = False
            finished = False
            while not finished:
                events = await next_events(handle)
                if events is None:
                    yield None
                    continue
                for event in events:
                    if isinstance(event, Failed):
                        raise event.error
                    piece = ""
                    if isinstance(event, TextDelta):
                        piece = cleaner.push(event.text)
                        tally.logprobs.extend(event.logprobs)
                        tally.unsent.extend(event.logprobs)
                    if isinstance(event, Finished):
                        piece += cleaner.finish()
                        tally.input_tokens += event.prompt_tokens
                        tally.output_tokens += event.completion_tokens
                        finished = True
                    if piece:
                        if not segment_started:
                            piece = separator(tally.last_char, piece) + piece
                            segment_started = True
                        if observer is not None and not text_started:
                            observer.first_token()
                        text_started = True
                        tally.last_char = piece[-1]
                        yield piece
                    if finished:
                        break
        _report(observer, prepared, tally.input_tokens, tally.output_tokens)

    @staticmethod
    def usage(prepared: PreparedTranscription, tally: TokenTally) -> UsageTokens:
        audio_tokens = sum(job.audio_tokens for job in prepared.jobs)
        return UsageTokens(
            input_tokens=tally.input_tokens,
            output_tokens=tally.output_tokens,
            total_tokens=tally.input_tokens + tally.output_tokens,
            input_token_details=InputTokenDetails(
                audio_tokens=audio_tokens,
                text_tokens=max(0, tally.input_tokens - audio_tokens),
            ),
        )

    async def stream(
        self,
        prepared: PreparedTranscription,
        handles: list[GenerationHandle],
        observer: GenerationObserver | None = None,
    ) -> AsyncIterator[bytes]:
        """``transcript.text.delta`` events, then one ``transcript.text.done``; an error
        after the stream started is one final ``{"error": ...}`` event."""
        text = ""
        tally = TokenTally()
        include_logprobs = prepared.options.include_logprobs
        token_bytes = self._runtime.bundle.token_bytes
        try:
            async for piece in self.pieces(prepared, handles, tally, observer):
                if piece is None:
                    yield KEEPALIVE
                    continue
                text += piece
                delta = TranscriptTextDeltaEvent(delta=piece)
                if include_logprobs:
                    delta = TranscriptTextDeltaEvent(
                        delta=piece, logprobs=token_logprobs(tally.take_unsent(), token_bytes)
                    )
                yield sse_event(json_encoder.encode(delta))
            usage = self.usage(prepared, tally)
            done = TranscriptTextDoneEvent(text=text, usage=usage)
            if include_logprobs:
                done = TranscriptTextDoneEvent(
                    text=text, usage=usage, logprobs=token_logprobs(tally.logprobs, token_bytes)
                )
            yield sse_event(json_encoder.encode(done))
        except Exception as exc:  # never a bare broken stream
            error = exc if isinstance(exc, APIError) else EngineError(f"stream failed: {exc}")
            if observer is not None:
                observer.failed(error)
            yield sse_event(json_encoder.encode(error.to_body())) + DONE
        finally:
            for handle in handles:
                handle.cancel()  # client gone or stream done: the rows leave the batch

"""Routes for /v1/audio/transcriptions and /v1/audio/translations.

Multipart bodies (what OpenAI's SDK, subtitle tools and chat UIs send) are parsed in
memory, under the app's request body limit; the upload's file name is only ever used
for its extension, as a hint for the decoder. Open WebUI's JSON variant
(``{"model", "language"?, "input_audio": {"data", "format"}}``) is accepted on
``/v1/audio/transcriptions`` too.
"""

from __future__ import annotations

import re
from typing import Any

from litestar import Request, Response, post
from litestar.response import Stream

from oai_audio_server.errors import InvalidRequestError, UnsupportedMediaTypeError
from oai_audio_server.http.body import (
    INLINE_BYTES,
    is_json_media_type,
    media_type,
    read_chunks,
    read_json,
)
from oai_audio_server.http.disconnect import ClientDisconnected, unless_disconnected
from oai_audio_server.http.multipart_form import FormPart, parse_multipart_parts
from oai_audio_server.http.request_log import current_record
from oai_audio_server.http.routes import SSE_HEADERS
from oai_audio_server.runtime import Runtime
from oai_audio_server.transcription.formats import render
from oai_audio_server.transcription.prompts import Task
from oai_audio_server.transcription.protocol import (
    TranscriptionOptions,
    transcription_json_decoder,
)
from oai_audio_server.transcription.service import (
    PreparedTranscription,
    TranscriptionService,
)

_EXTENSION = re.compile(r"[a-z0-9]{1,8}")
_MEDIA_SUBTYPES = {"mpeg": "mp3", "x-wav": "wav", "wave": "wav", "x-flac": "flac"}


def format_hint(filename: str | None, content_type: str | None) -> str | None:
    """A decoder hint from the file's extension or media type; never a path."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    if "." in name:
        extension = name.rsplit(".", 1)[-1].lower()
        if _EXTENSION.fullmatch(extension):
            return extension
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    major, _, subtype = media_type.partition("/")
    if major in ("audio", "video") and _EXTENSION.fullmatch(subtype):
        return _MEDIA_SUBTYPES.get(subtype, subtype)
    return None


def _text_field(parts: list[FormPart], name: str) -> str | None:
    for part in parts:
        if part.name == name:
            if part.filename is not None:
                raise InvalidRequestError(f"{name} must be a text field, not a file", param=name)
            return part.text()
    return None


async def _from_form(
    runtime: Runtime, service: TranscriptionService, request: Request[Any, Any, Any], task: Task
) -> PreparedTranscription:
    # The body is already capped by the app's size limit; parsing it in memory means no
    # upload is ever spooled to a temporary file.
    chunks = await read_chunks(request)
    content_type = request.headers.get("content-type")
    if sum(len(chunk) for chunk in chunks) > INLINE_BYTES:  # work in proportion to the body
        parts = await runtime.offload(parse_multipart_parts, chunks, content_type)
    else:
        parts = parse_multipart_parts(chunks, content_type)
    granularities = [
        part.text()
        for part in parts
        if part.name in ("timestamp_granularities[]", "timestamp_granularities")
    ]
    include = [part.text() for part in parts if part.name in ("include[]", "include")]
    options = TranscriptionOptions.from_fields(
        task,
        model=_text_field(parts, "model"),
        language=_text_field(parts, "language") if task == "transcribe" else None,
        prompt=_text_field(parts, "prompt"),
        response_format=_text_field(parts, "response_format"),
        temperature=_text_field(parts, "temperature"),
        stream=_text_field(parts, "stream"),
        timestamp_granularities=granularities,
        include=include,
    )
    upload = next((part for part in parts if part.name == "file"), None)
    if upload is None:
        raise InvalidRequestError(
            "the file field is required: send the audio as a multipart/form-data "
            "file part named 'file'",
            param="file",
        )
    hint = format_hint(upload.filename, upload.content_type)
    return await service.prepare_bytes(options, upload.data, hint, param="file")


async def _from_json(
    runtime: Runtime, service: TranscriptionService, request: Request[Any, Any, Any], task: Task
) -> PreparedTranscription:
    decoded = await read_json(runtime, request, transcription_json_decoder)
    body = decoded.value
    options = TranscriptionOptions.from_fields(
        task,
        model=body.model,
        language=body.language,
        prompt=body.prompt,
        response_format=body.response_format,
        temperature=body.temperature,
        stream=body.stream,
        timestamp_granularities=body.timestamp_granularities,
        include=body.include,
    )
    audio = body.input_audio
    data = decoded.long_strings.resolve(audio.data)
    return await service.prepare_base64(options, data, audio.format, param="input_audio")


def build_transcription_routes(runtime: Runtime) -> list[Any]:
    service = TranscriptionService(runtime.settings, runtime)

    async def handle(request: Request[Any, Any, Any], task: Task) -> Response[Any]:
        kind = media_type(request)
        if task == "transcribe" and is_json_media_type(kind):
            prepared = await _from_json(runtime, service, request, task)
        elif kind == "multipart/form-data":
            prepared = await _from_form(runtime, service, request, task)
        else:
            raise UnsupportedMediaTypeError(
                f"the request's Content-Type is {kind or 'missing'}; send the audio as "
                "multipart/form-data with a 'file' part"
                + (" (or JSON with input_audio)" if task == "transcribe" else ""),
                param="file",
            )
        handles = service.submit(prepared)
        record = current_record(request.scope)  # tokens and TTFT for logs and metrics
        if prepared.options.stream:
            record.stream = True
            events = service.stream(prepared, handles, observer=record)
            return Stream(events, media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            result = await unless_disconnected(
                request, service.transcribe(prepared, handles, observer=record)
            )
        except ClientDisconnected:
            return Response(content=b"", status_code=499)
        body = render(result, prepared.options.response_format)
        return Response(content=body.content, status_code=200, media_type=body.media_type)

    @post(
        "/v1/audio/transcriptions",
        status_code=200,
        summary="Transcribe audio (OpenAI Whisper API shapes)",
    )
    async def transcriptions(request: Request[Any, Any, Any]) -> Response[Any]:
        return await handle(request, "transcribe")

    @post(
        "/v1/audio/translations",
        status_code=200,
        summary="Translate speech into English text (OpenAI Whisper API shapes)",
    )
    async def translations(request: Request[Any, Any, Any]) -> Response[Any]:
        return await handle(request, "translate")

    return [transcriptions, translations]

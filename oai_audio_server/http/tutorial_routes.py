"""The two routes of the FastAPI tutorial script, for people migrating from it.

``POST /audio/`` answers a question about an uploaded file; ``GET /test-audio/`` about a
file on the server. Both run through the chat service, so every limit of
``/v1/chat/completions`` applies. Safety rules the tutorial lacked:

* the upload is parsed in memory; its filename is never used as a path and nothing
  is written to disk;
* ``/test-audio/`` reads only files whose resolved path (symlinks and ``..`` followed)
  lies inside ``--allowed-local-media-path``; anything else, or any path at all when that
  setting is unset, is a 403.
"""

from __future__ import annotations

import asyncio
import base64
import pathlib
import time
from typing import Any

from litestar import Request, Response, get, post
from litestar.params import Parameter

from oai_audio_server.chat.service import ChatService
from oai_audio_server.errors import (
    APIError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from oai_audio_server.http.body import read_chunks
from oai_audio_server.http.disconnect import ClientDisconnected, unless_disconnected
from oai_audio_server.http.long_strings import LongStrings
from oai_audio_server.http.multipart_form import parse_multipart
from oai_audio_server.http.request_log import current_record
from oai_audio_server.http.transcription_routes import format_hint
from oai_audio_server.memory import AnonymousBuffer
from oai_audio_server.protocol import (
    AudioURL,
    AudioURLPart,
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    InputAudio,
    InputAudioPart,
    TextPart,
    json_encoder,
)
from oai_audio_server.runtime import Runtime
from oai_audio_server.settings import Settings

DEFAULT_QUESTION = "what does the person say?"


def allowed_local_file(settings: Settings, raw: str) -> pathlib.Path:
    """The resolved file ``raw`` names, if it lies inside allowed_local_media_path.

    Relative paths are taken relative to that directory. Symlinks and ``..`` are
    resolved before the check, so neither can lead outside it.
    """
    if settings.allowed_local_media_path is None:
        raise PermissionDeniedError(
            "reading audio files on the server is disabled; start the server with "
            "--allowed-local-media-path DIR (OAS_ALLOWED_LOCAL_MEDIA_PATH) to allow files "
            "inside DIR, or upload the file to POST /audio/",
            param="audio",
        )
    outside = PermissionDeniedError(
        "the audio path is outside the server's allowed local media directory",
        param="audio",
    )
    if not raw or "\x00" in raw:
        raise outside
    try:
        root = pathlib.Path(settings.allowed_local_media_path).resolve()
        target = (root / raw).resolve()  # an absolute raw path replaces root
    except (OSError, RuntimeError, ValueError) as error:
        raise outside from error
    if not target.is_relative_to(root):
        raise outside
    if not target.is_file():
        raise NotFoundError(
            "no audio file at that path in the allowed local media directory",
            param="audio",
            code="file_not_found",
        )
    return target


# A multiple of 3, so that each step's base64 joins the next without padding.
_ENCODE_STEP = 3 * 256 * 1024


def base64_in_steps(data: bytes | memoryview) -> memoryview:
    """The upload's base64, written a step at a time into anonymous memory: one
    ``b64encode`` of 25 MiB would hold the GIL, and with it the event loop, throughout."""
    out = AnonymousBuffer((len(data) + 2) // 3 * 4)
    for start in range(0, len(data), _ENCODE_STEP):
        out.write(base64.b64encode(data[start : start + _ENCODE_STEP]))
    return out.view()


def build_tutorial_routes(runtime: Runtime) -> list[Any]:
    settings = runtime.settings
    chat = ChatService(settings, runtime)

    async def answer(
        request: Request[Any, Any, Any],
        audio: ContentPart,
        question: str,
        param: str,
        payloads: LongStrings | None = None,
    ) -> Response[Any]:
        started = time.perf_counter()
        chat_request = ChatCompletionRequest(
            model=settings.model_name,
            messages=[ChatMessage(role="user", content=[audio, TextPart(text=question)])],
        )
        try:
            prepared = await chat.prepare(chat_request, (payloads or LongStrings()).resolve)
        except APIError as error:
            # The chat service names chat-request fields; these clients sent form fields.
            if error.param and error.param.startswith("messages"):
                error.param = param
            raise
        try:
            completion = await unless_disconnected(
                request, chat.complete(prepared, current_record(request.scope))
            )
        except ClientDisconnected:
            return Response(content=b"", status_code=499)
        reply = {
            "response": completion.choices[0].message.content,
            "status": "success",
            "time": round(time.perf_counter() - started, 3),
        }
        return Response(
            content=json_encoder.encode(reply), status_code=200, media_type="application/json"
        )

    @post(
        "/audio/",
        status_code=200,
        summary="Tutorial: ask about an uploaded audio file",
        description="multipart/form-data with a 'file' part and an optional 'text' field "
        f"(default: '{DEFAULT_QUESTION}'). Replies "
        '{"response": <answer>, "status": "success", "time": <seconds>}.',
    )
    async def tutorial_upload(request: Request[Any, Any, Any]) -> Response[Any]:
        form = await runtime.offload(
            parse_multipart, await read_chunks(request), request.headers.get("content-type")
        )
        upload = form.get("file")
        if upload is None:
            raise InvalidRequestError(
                "the form has no 'file' part; upload the audio as 'file'",
                param="file",
                code="missing_file",
            )
        question = form["text"].text() if "text" in form else DEFAULT_QUESTION
        payloads = LongStrings()  # the upload goes to the chat path without a large str
        encoded = payloads.add(await runtime.offload(base64_in_steps, upload.data))
        audio = InputAudioPart(InputAudio(data=encoded, format=format_hint(upload.filename, None)))
        return await answer(request, audio, question or DEFAULT_QUESTION, "file", payloads)

    @get(
        "/test-audio/",
        summary="Tutorial: ask about an audio file on the server",
        description="Reads 'audio' only inside --allowed-local-media-path (403 otherwise).",
    )
    async def tutorial_local_file(
        request: Request[Any, Any, Any],
        audio_path: str = Parameter(query="audio", description="path of the audio file"),
        text: str = Parameter(default=DEFAULT_QUESTION, description="question about the audio"),
    ) -> Response[Any]:
        target = await asyncio.to_thread(allowed_local_file, settings, audio_path)
        # The file:// reader checks containment again and caps the size while reading.
        part = AudioURLPart(AudioURL(url=target.as_uri()))
        return await answer(request, part, text or DEFAULT_QUESTION, "audio")

    return [tutorial_upload, tutorial_local_file]

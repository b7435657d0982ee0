"""The OpenAPI 3.1 document as the routes really behave.

The routes read their bodies themselves (so that size, media type and decoding stay
under this server's rules), which leaves Litestar with nothing to describe. This module
completes Litestar's document: every request body (chat JSON from the msgspec types,
the multipart forms), every reply (JSON schemas, server-sent events, subtitle and text
formats) and OpenAI's error body for every other status.
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec
from msgspec import Struct

from oai_audio_server.protocol import ChatCompletion, ChatCompletionRequest, ModelCard, ModelList
from oai_audio_server.settings import Settings
from oai_audio_server.transcription.protocol import (
    RESPONSE_FORMATS,
    TIMESTAMP_GRANULARITIES,
    Transcription,
    TranscriptionJSONRequest,
    TranscriptionVerbose,
)

REF = "#/components/schemas/{name}"


class ErrorDetail(Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(Struct):
    """OpenAI's error body: every 4xx and 5xx reply of this server."""

    error: ErrorDetail


class TutorialReply(Struct):
    response: str
    status: str
    time: float


class Alive(Struct):
    status: str


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(name=name)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


_TEXT = {"type": "string"}
# One server-sent event, in the form OpenAPI 3.2's itemSchema gives events (3.1 tools
# read a text/event-stream schema as describing each event).
_SSE = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "description": "one server-sent event; chat streams end with 'data: [DONE]', "
    "transcription streams with a transcript.text.done event; an error after the 200 is "
    "one final event whose data is OpenAI's error body",
    "properties": {
        "data": {"type": "string", "description": "a JSON chunk, an error body or [DONE]"},
        "event": {"type": "string"}, "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}}}
_ERRORS = {"default": {"description": "OpenAI's error body", "content": _json(_ref("ErrorBody"))}}


def _json_replies(description: str, schema: str) -> dict[str, Any]:
    """A 200 with the named JSON schema, and OpenAI's error body otherwise."""
    return {"200": {"description": description, "content": _json(_ref(schema))}, **_ERRORS}
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}}


def _form(task: str, names: list[str]) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "file": {"type": "string", "contentMediaType": "application/octet-stream",
                 "description": "the audio file (wav, mp3, flac, ogg, m4a, webm, ...)"},
        "model": {"type": "string", "enum": names},
        "prompt": {"type": "string"},
        "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS)},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "stream": {"type": "boolean"},
    }
    if task == "transcribe":
        properties["language"] = {"type": "string", "description": "ISO-639-1 code"}
        properties["timestamp_granularities[]"] = {
            "type": "array", "items": {"type": "string", "enum": list(TIMESTAMP_GRANULARITIES)}
        }
    return {"type": "object", "required": ["file", "model"], "properties": properties}


def _transcription_replies() -> dict[str, Any]:
    return {"200": {"description": "the transcript in the requested response_format", "content": {
        **_json({"oneOf": [_ref("Transcription"), _ref("TranscriptionVerbose")]}),
        "text/plain": {"schema": _TEXT}, "text/vtt": {"schema": _TEXT}, **_SSE,
    }}, **_ERRORS}


def _operations(settings: Settings) -> dict[tuple[str, str], dict[str, Any]]:
    chat_body = _ref("ChatCompletionRequest")
    form = "multipart/form-data"
    names = list(settings.served_names)
    hello = {"model": names[0], "messages": [{"role": "user", "content": "Hello"}],
             "max_tokens": 4}
    chat_examples = {"json": {"value": hello},
                     "stream": {"value": {**hello, "stream": True}}}
    return {
        ("/v1/chat/completions", "post"): {
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": chat_body, "examples": chat_examples}}},
            "responses": {"200": {"description": "a completion, or its stream", "content": {
                **_json(_ref("ChatCompletion")), **_SSE}}, **_ERRORS},
        },
        ("/v1/audio/transcriptions", "post"): {
            "requestBody": {"required": True, "content": {
                form: {"schema": _form("transcribe", names)},
                **_json(_ref("TranscriptionJSONRequest")),
            }},
            "responses": _transcription_replies(),
        },
        ("/v1/audio/translations", "post"): {
            "requestBody": {"required": True, "content": {
                form: {"schema": _form("translate", names)}}},
            "responses": _transcription_replies(),
        },
        ("/audio", "post"): {
            "requestBody": {"required": True, "content": {form: {"schema": {
                "type": "object", "required": ["file"], "properties": {
                    "file": {"type": "string", "contentMediaType": "application/octet-stream"},
                    "text": {"type": "string"}}}}}},
            "responses": _json_replies("the answer", "TutorialReply"),
        },
        ("/test-audio", "get"): {
            "responses": _json_replies("the answer", "TutorialReply"),
        },
        ("/v1/models", "get"): {
            "responses": _json_replies("the served names", "ModelList"),
        },
        ("/v1/models/{model_id}", "get"): {
            "responses": _json_replies("one served name", "ModelCard"),
        },
        ("/health", "get"): {
            "responses": {"200": {"description": "ready; engine counters with the API key",
                                  "content": _json({
                                      "type": "object", "required": ["status"],
                                      "properties": {"status": {"const": "ok"}},
                                      "additionalProperties": {"type": "integer"}})},
                          "503": {"description": "loading, failed to load, shutting down "
                                  "or restarting", "headers": _RETRY_AFTER,
                                  "content": _json(_ref("ErrorBody"))}, **_ERRORS},
        },
        ("/health", "head"): {
            "responses": {"200": {"description": "ready"},
                          "503": {"description": "not ready", "headers": _RETRY_AFTER}},
        },
        ("/live", "get"): {
            "responses": {"200": {"description": "alive", "content": _json(_ref("Alive"))},
                          "503": {"description": "the engine died; the process exits",
                                  "content": _json(_ref("ErrorBody"))}, **_ERRORS},
        },
        ("/live", "head"): {
            "responses": {"200": {"description": "alive"}, "503": {"description": "exiting"}},
        },
        ("/metrics", "get"): {
            "responses": {"200": {"description": "Prometheus text exposition format",
                                  "content": {"text/plain": {"schema": _TEXT}}}, **_ERRORS},
        },
    }


def _components(settings: Settings) -> dict[str, Any]:
    types = [ChatCompletionRequest, ChatCompletion, ModelList, ModelCard, Transcription,
             TranscriptionVerbose, TranscriptionJSONRequest, ErrorBody, TutorialReply, Alive]
    _, components = msgspec.json.schema_components(types, ref_template=REF)
    request = components["ChatCompletionRequest"]["properties"]
    for name in ("max_tokens", "max_completion_tokens"):
        # The server's own bound, so that the document tells the truth about it.
        for option in request[name].get("anyOf", []):
            if option.get("type") == "integer":
                option["maximum"] = settings.max_tokens_limit
    request["model"] = {"type": "string", "enum": list(settings.served_names)}
    return components


def complete_schema(generated: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Litestar's document with the bodies, replies and errors filled in."""
    schema = copy.deepcopy(generated)
    schema["openapi"] = "3.1.0"
    paths: dict[str, Any] = schema.setdefault("paths", {})
    for (path, method), spec in _operations(settings).items():
        operation = paths.get(path, {}).get(method)
        if operation is None:
            continue  # a route this app does not have
        operation.pop("requestBody", None)
        operation.update(copy.deepcopy(spec))
    for item in paths.values():  # anything else still answers errors in OpenAI's shape
        for method, operation in item.items():
            if isinstance(operation, dict) and method in ("get", "post", "head", "put",
                                                          "delete", "patch", "options"):
                operation.setdefault("responses", {}).update(copy.deepcopy(_ERRORS))
    components = schema.setdefault("components", {})
    components["schemas"] = {**components.get("schemas", {}), **_components(settings)}
    return schema

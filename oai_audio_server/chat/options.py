"""The chat request fields that shape generation beyond temperature and length:
``n``, ``logprobs``/``top_logprobs``, ``presence_penalty``/``frequency_penalty``,
``logit_bias``, ``response_format`` and audio sent as a ``file`` part. Each is checked
here and turned into what the engine takes (engine/types.py), with a 400 naming the
field for a value the server cannot honour."""

from __future__ import annotations

from oai_audio_server.audio.payload import Payload, head, strip_payload
from oai_audio_server.chat.messages import not_an_audio_file
from oai_audio_server.engine.grammar import canonical_schema
from oai_audio_server.engine.sampling import MAX_LOGIT_BIAS
from oai_audio_server.engine.types import GrammarSpec
from oai_audio_server.errors import InvalidRequestError
from oai_audio_server.protocol import ChatCompletionRequest

# Choices per request: each is a row of the batch for as long as it runs.
MAX_CHOICES = 8


def choice_count(request: ChatCompletionRequest) -> int:
    n = request.n or 1
    if n > MAX_CHOICES:
        raise InvalidRequestError(
            f"n is {n}; this server returns at most {MAX_CHOICES} choices per request",
            param="n",
            code="integer_above_max_value",
        )
    return n


def logprob_options(request: ChatCompletionRequest) -> tuple[bool, int]:
    """(log probabilities wanted, how many alternatives per token)."""
    if request.top_logprobs and not request.logprobs:
        raise InvalidRequestError(
            "top_logprobs needs logprobs set to true",
            param="top_logprobs",
        )
    return bool(request.logprobs), request.top_logprobs or 0


def logit_bias(request: ChatCompletionRequest, vocab_size: int) -> tuple[tuple[int, float], ...]:
    bias = request.logit_bias
    if not bias:
        return ()
    if len(bias) > MAX_LOGIT_BIAS:
        raise InvalidRequestError(
            f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS} are allowed",
            param="logit_bias",
        )
    entries = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab_size:
            raise InvalidRequestError(
                f"logit_bias key {key!r} is not a token id of this model's vocabulary "
                f"(0-{vocab_size - 1})",
                param="logit_bias",
            )
        if not -100.0 <= value <= 100.0:
            raise InvalidRequestError(
                f"logit_bias value {value} for token {key} is outside -100..100",
                param="logit_bias",
            )
        entries.append((token, float(value)))
    return tuple(entries)


def grammar_spec(request: ChatCompletionRequest) -> GrammarSpec | None:
    """``response_format``: text (no grammar), json_object or json_schema."""
    response_format = request.response_format
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object")
    if kind == "json_schema":
        body = response_format.get("json_schema")
        schema = body.get("schema") if isinstance(body, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequestError(
                "response_format json_schema needs {\"json_schema\": {\"name\": ..., "
                "\"schema\": {...}}}: the schema as a JSON object",
                param="response_format.json_schema.schema",
            )
        return GrammarSpec("json_schema", canonical_schema(schema))
    raise InvalidRequestError(
        f"response_format type {kind!r} is not supported; use \"text\", \"json_object\" "
        "or \"json_schema\"",
        param="response_format.type",
    )


def audio_file_data(data: Payload) -> Payload:
    """A file part's ``file_data`` when it is a data:audio/... URI (else a 400)."""
    start = head(strip_payload(data), 80).lower()
    if not start.startswith("data:"):
        raise not_an_audio_file("is not a data: URI")
    media_type = start[5:].split(",", 1)[0].split(";", 1)[0].strip()
    if not media_type.startswith("audio/"):
        raise not_an_audio_file(f"is {media_type or 'a data: URI without a media type'}")
    return data

"""Wire types, named after OpenAI's schema, as msgspec Structs.

Requests are decoded strictly (wrong types are 400s whose ``param`` names the field), but
unknown fields are ignored: chat UIs send many OpenAI fields (``tools``, ``user``, ...) that
a server without them must accept. Fields accepted but not acted on are
documented in the README.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType, field

# ---------------------------------------------------------------- chat request


class TextPart(Struct, tag="text", tag_field="type", frozen=True):
    text: str


class InputAudio(Struct, frozen=True):
    data: str
    format: str | None = None


class InputAudioPart(Struct, tag="input_audio", tag_field="type", frozen=True):
    input_audio: InputAudio


class AudioURL(Struct, frozen=True):
    url: str


class AudioURLPart(Struct, tag="audio_url", tag_field="type", frozen=True):
    audio_url: AudioURL


class ImageURLPart(Struct, tag="image_url", tag_field="type", frozen=True):
    """Accepted by the schema only to answer with a clear 'not supported' error."""

    image_url: dict[str, Any]


class FileData(Struct, frozen=True):
    file_data: str | None = None  # a data: URI; audio ones are taken as audio
    file_id: str | None = None
    filename: str | None = None


class FilePart(Struct, tag="file", tag_field="type", frozen=True):
    """OpenAI's file part (LangChain and LiteLLM send audio files this way)."""

    file: FileData


ContentPart = TextPart | InputAudioPart | AudioURLPart | ImageURLPart | FilePart
# The part types a user message may carry, for the 400 an unknown one gets.
CONTENT_PART_TYPES = ("text", "input_audio", "audio_url", "file")
MessageContent = str | list[ContentPart] | None

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ChatMessage(Struct, frozen=True):
    role: Role
    content: MessageContent = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(Struct, frozen=True):
    include_usage: bool = False


Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]


class ChatCompletionRequest(Struct, frozen=True):
    model: str
    messages: list[ChatMessage]
    stream: bool | None = None  # null is allowed, as by OpenAI: not streamed
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    # Beyond any vocabulary it keeps every token, like 0; bounded so it fits a tensor.
    top_k: Annotated[int, Meta(ge=0, le=2**31 - 1)] | None = None
    stop: str | list[str] | None = None
    # torch generators take 64-bit seeds; larger ones are a 400, not a crash.
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0)] | None = None
    n: Annotated[int, Meta(ge=1)] | None = None  # at most MAX_CHOICES (chat/options.py)
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None  # token id -> -100..100
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    response_format: dict[str, Any] | None = None  # text, json_object or json_schema
    # Accepted, and answered with plain text (see README and chat/unsupported.py): clients
    # send them with every request. Values that need a feature this model lacks are a 400.
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None  # the deprecated form of tools
    function_call: Any = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None


# ---------------------------------------------------------------- chat response


class PromptTokensDetails(Struct, frozen=True):
    audio_tokens: int = 0
    cached_tokens: int = 0


class Usage(Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


FinishReason = Literal["stop", "length"]


class AssistantMessage(Struct, frozen=True):
    content: str
    role: Literal["assistant"] = "assistant"
    refusal: None = None


class TopLogprob(Struct, frozen=True):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(Struct, frozen=True):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Struct, frozen=True):
    content: list[TokenLogprobEntry] | None
    refusal: None = None


class ChatCompletionChoice(Struct, frozen=True):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(Struct, frozen=True):
    id: str
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None


class ChunkDelta(Struct, frozen=True, omit_defaults=True):
    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType = UNSET


class ChunkChoice(Struct, frozen=True):
    index: int
    delta: ChunkDelta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(Struct, frozen=True):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    # Present (as null) on every chunk when include_usage is on, as OpenAI does.
    usage: Usage | None | UnsetType = UNSET
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    system_fingerprint: str | None = None


# ---------------------------------------------------------------- models


class ModelCard(Struct, frozen=True):
    id: str
    created: int
    owned_by: str = "oai-audio-server"
    object: Literal["model"] = "model"


class ModelList(Struct, frozen=True):
    data: list[ModelCard] = field(default_factory=list)
    object: Literal["list"] = "list"


chat_request_decoder = msgspec.json.Decoder(ChatCompletionRequest)
json_encoder = msgspec.json.Encoder()

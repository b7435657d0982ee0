"""Turn a Conversation into prompt token ids, token for token as ``model.chat`` would.

The official ``make_context`` lets request text reach the tokenizer with the audio tags
allowed as special tokens, so a user text containing ``<audio>/etc/passwd</audio>`` makes
the tokenizer open that path. Here the tokenizer only ever sees:

* ``from_list_format`` over items whose audio "paths" are per-request random nonces, used
  only to find where each audio span sits in the formatted string (nothing is opened);
* the plain text between those spans, encoded with no special tokens allowed, so tags and
  ChatML markers in request text stay literal text.

Audio spans become ``<audio>`` + pads + ``</audio>`` built from the features we computed.
For text without special-token strings this is exactly what the official code encodes,
because tiktoken encodes the text between special tokens piece by piece.

Tokenising costs time in proportion to the text, so text that cannot fit the window is
refused (or, for an old history turn, dropped as the official rule would) by a bound
that needs no tokeniser: no token covers more than ``max_token_bytes`` UTF-8 bytes, and
a character is at least one byte, so ``len(text) / max_token_bytes`` tokens at least.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Protocol

from oai_audio_server.audio.types import AudioSegmentFeatures
from oai_audio_server.errors import ContextLengthExceededError
from oai_audio_server.qwen.conversation import AudioItem, Conversation, TextItem, UserItem


def longest_token_bytes(token_bytes: list[bytes]) -> int:
    """The most UTF-8 bytes one token stands for (special tokens' text included, which
    only makes the bound weaker, never wrong)."""
    return max((len(token) for token in token_bytes), default=1) or 1


class QwenTokenizerLike(Protocol):
    """The parts of the tokenizer the prompt builder relies on."""

    audio_start_tag: str
    audio_end_tag: str
    audio_start_id: int
    audio_end_id: int
    audio_pad_id: int
    im_start_id: int
    im_end_id: int

    def encode_text(self, text: str) -> list[int]: ...

    def from_list_format(self, list_format: list[dict[str, str]]) -> str: ...


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    audio_segments: list[AudioSegmentFeatures]

    @property
    def audio_token_count(self) -> int:
        return sum(segment.token_count + 2 for segment in self.audio_segments)


@dataclass
class _EncodedTurn:
    tokens: list[int]
    audio: list[AudioSegmentFeatures]


class QwenPromptBuilder:
    def __init__(
        self, tokenizer: QwenTokenizerLike, *, max_window_size: int, max_token_bytes: int = 0
    ) -> None:
        self._tokenizer = tokenizer
        self._max_window_size = max_window_size
        # 0: no cheap bound (every text is tokenised).
        self._max_chars = max_window_size * max_token_bytes if max_token_bytes > 0 else 0
        self.max_token_bytes = max_token_bytes
        self._newline = self._plain("\n")
        self._role_tokens = {role: self._plain(role) for role in ("system", "user", "assistant")}

    def _plain(self, text: str) -> list[int]:
        """Encode request text with every special-token string kept as literal text."""
        if not text:
            return []
        return self._tokenizer.encode_text(text)

    def _message(self, role: str, content: list[int]) -> list[int]:
        tok = self._tokenizer
        return [tok.im_start_id, *self._role_tokens[role], *self._newline, *content, tok.im_end_id]

    def _user_content(self, items: tuple[UserItem, ...]) -> _EncodedTurn:
        tok = self._tokenizer
        nonce = secrets.token_hex(16)
        list_format: list[dict[str, str]] = []
        segments: list[AudioSegmentFeatures] = []
        for item in items:
            if isinstance(item, TextItem):
                list_format.append({"text": item.text})
            elif isinstance(item, AudioItem):
                # A long audio goes to the model as consecutive audio items of <= 30 s.
                for segment in item.audio.segments:
                    list_format.append({"audio": f"{nonce}-{len(segments)}"})
                    segments.append(segment)
        formatted = tok.from_list_format(list_format)

        tokens: list[int] = []
        cursor = 0
        for index, segment in enumerate(segments):
            span = f"{tok.audio_start_tag}{nonce}-{index}{tok.audio_end_tag}"
            start = formatted.index(span, cursor)
            tokens += self._plain(formatted[cursor:start])
            pads = [tok.audio_pad_id] * segment.token_count
            tokens += [tok.audio_start_id, *pads, tok.audio_end_id]
            cursor = start + len(span)
        tokens += self._plain(formatted[cursor:])
        return _EncodedTurn(tokens, segments)

    def _least_tokens(self, chars: int) -> int:
        """Fewest tokens ``chars`` characters of text can take (0 without a bound)."""
        if not self._max_chars:
            return 0
        return -(-chars * self._max_window_size // self._max_chars)

    def _refuse_unfittable(self, conversation: Conversation) -> None:
        chars = len(conversation.system) + _text_chars(conversation.query)
        if self._least_tokens(chars) > self._max_window_size:
            raise ContextLengthExceededError(
                f"the request's system and last user text are {chars} characters, more than "
                f"the model's {self._max_window_size}-token window can hold whatever the "
                "text; send shorter text",
                param="messages",
            )

    def build(self, conversation: Conversation) -> Prompt:
        self._refuse_unfittable(conversation)  # before any tokenising
        newline = self._newline
        system_tokens = self._message("system", self._plain(conversation.system))

        # Newest history first; the oldest turns are dropped once the window is full,
        # with the same rule as the official make_context (so prompts stay identical).
        context: list[int] = []
        context_audio: list[AudioSegmentFeatures] = []
        for turn in reversed(conversation.history):
            at_least = self._least_tokens(_text_chars(turn.query) + len(turn.response))
            if len(system_tokens) + at_least + len(context) >= self._max_window_size:
                break  # cannot fit: dropped with all older turns, without tokenising it
            query = self._user_content(turn.query)
            turn_tokens = [
                *newline,
                *self._message("user", query.tokens),
                *newline,
                *self._message("assistant", self._plain(turn.response)),
            ]
            if len(system_tokens) + len(turn_tokens) + len(context) >= self._max_window_size:
                break
            context = turn_tokens + context
            context_audio = query.audio + context_audio

        query = self._user_content(conversation.query)
        tok = self._tokenizer
        token_ids = [
            *system_tokens,
            *context,
            *newline,
            *self._message("user", query.tokens),
            *newline,
            tok.im_start_id,
            *self._role_tokens["assistant"],
            *newline,
        ]
        return Prompt(token_ids=token_ids, audio_segments=context_audio + query.audio)


def _text_chars(items: tuple[UserItem, ...]) -> int:
    return sum(len(item.text) for item in items if isinstance(item, TextItem))

"""Qwen2-Audio prompt ids from a Conversation, through the checkpoint's chat template.

The conversation becomes the processor's message list (system, then each history turn
as a user message with its audio and text parts and an assistant message, then the
query). Each audio segment of at most 30 s is one audio part; the template's
``<|AUDIO|>`` for it is expanded to one token per audio embedding, wrapped in
``<|audio_bos|>``/``<|audio_eos|>`` when the template did not write them (as the
processor does). Every turn is kept: a conversation longer than the model's window is
answered with a 400 by the caller, not shortened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from oai_audio_server.audio.types import AudioSegmentFeatures
from oai_audio_server.models.qwen2_audio.chat_template import (
    Special,
    TemplateRenderer,
    load_template,
)
from oai_audio_server.models.qwen2_audio.tokenizer import (
    AUDIO,
    AUDIO_BOS,
    AUDIO_EOS,
    Qwen2AudioTokenizer,
)
from oai_audio_server.qwen.conversation import AudioItem, Conversation, TextItem, UserItem
from oai_audio_server.qwen.prompt import Prompt


class Qwen2PromptBuilder:
    def __init__(
        self, tokenizer: Qwen2AudioTokenizer, template: str, *, max_token_bytes: int = 0
    ) -> None:
        self.max_token_bytes = max_token_bytes  # 0: no bound before tokenising
        self._tokenizer = tokenizer
        self._renderer = TemplateRenderer(template, list(tokenizer.special_tokens))

    @classmethod
    def from_dir(
        cls, tokenizer: Qwen2AudioTokenizer, model_dir: Path, *, max_token_bytes: int = 0
    ) -> Qwen2PromptBuilder:
        return cls(tokenizer, load_template(model_dir), max_token_bytes=max_token_bytes)

    @staticmethod
    def _user_message(
        items: tuple[UserItem, ...], segments: list[AudioSegmentFeatures]
    ) -> dict[str, Any]:
        parts: list[dict[str, Any]] = []
        for item in items:
            if isinstance(item, TextItem):
                parts.append({"type": "text", "text": item.text})
            elif isinstance(item, AudioItem):
                for segment in item.audio.segments:
                    parts.append({"type": "audio", "audio_url": f"segment-{len(segments)}"})
                    segments.append(segment)
        return {"role": "user", "content": parts}

    def messages(
        self, conversation: Conversation
    ) -> tuple[list[dict[str, Any]], list[AudioSegmentFeatures]]:
        """The processor's message list and the audio segments in template order."""
        segments: list[AudioSegmentFeatures] = []
        messages: list[dict[str, Any]] = [{"role": "system", "content": conversation.system}]
        for turn in conversation.history:
            messages.append(self._user_message(turn.query, segments))
            messages.append({"role": "assistant", "content": turn.response})
        messages.append(self._user_message(conversation.query, segments))
        return messages, segments

    def build(self, conversation: Conversation) -> Prompt:
        tok = self._tokenizer
        messages, segments = self.messages(conversation)
        pieces = self._renderer.render(messages)
        ids: list[int] = []
        audio_index = 0
        for index, piece in enumerate(pieces):
            if not isinstance(piece, Special):
                ids += tok.encode_text(piece.text)
                continue
            if piece.name != AUDIO:
                ids.append(tok.special_tokens[piece.name])
                continue
            if audio_index >= len(segments):
                raise ValueError("the chat template wrote more audio tokens than there are audios")
            count = segments[audio_index].token_count
            audio_index += 1
            before = pieces[index - 1] if index else None
            after = pieces[index + 1] if index + 1 < len(pieces) else None
            wrapped = before == Special(AUDIO_BOS) or after == Special(AUDIO_EOS)
            span = [tok.audio_id] * count
            ids += span if wrapped else [tok.audio_bos_id, *span, tok.audio_eos_id]
        if audio_index != len(segments):
            raise ValueError(
                f"the chat template wrote {audio_index} audio tokens for {len(segments)} audios"
            )
        return Prompt(token_ids=ids, audio_segments=segments)

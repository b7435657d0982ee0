"""What the engine needs of a model family: one interface, so every family runs on the
same paged cache, batching, sampling and CUDA graphs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from oai_audio_server.audio.types import AudioSegmentFeatures
from oai_audio_server.models.attention import DecodeMeta, PrefillMeta
from oai_audio_server.models.kv_cache import KVLayout, PagedKVCache


@dataclass(frozen=True)
class AudioSpan:
    """Where one audio segment's embeddings sit in a prompt: positions ``start..end``
    (end excluded). ``context`` is what else those embeddings depend on: for Qwen-Audio
    the longest audio of the same prompt (its encoder cut), 0 where nothing does."""

    start: int
    end: int
    context: int = 0


class EngineModel(Protocol):
    max_len: int  # longest sequence (prompt + answer) a row may reach

    @property
    def kv_layout(self) -> KVLayout: ...

    def rotary_variant(self, prompt_len: int) -> int:
        """The rotary table a row uses for all its positions (Qwen-Audio's dynamic NTK
        is chosen by the prompt's length)."""
        ...

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor: ...

    def audio_spans(
        self, prompt: Sequence[int], audio: Sequence[AudioSegmentFeatures]
    ) -> list[AudioSpan]:
        """One span per audio segment, in order (ValueError if the prompt's audio
        placeholders do not match the audio)."""
        ...

    def embed_prompts(
        self,
        prompts: Sequence[Sequence[int]],
        audio: Sequence[Sequence[AudioSegmentFeatures]],
        starts: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """[len - start, hidden] per prompt: the embeddings from position ``start`` on
        (0 by default), audio spans filled from the encoder (one batch). Audio wholly
        before ``start`` (a prefix already in the cache) is not encoded."""
        ...

    def prefill(
        self, embeds: torch.Tensor, positions: torch.Tensor, variants: torch.Tensor,
        cache: PagedKVCache, meta: PrefillMeta,
    ) -> torch.Tensor:
        """Packed chunks [tokens, hidden] at ``positions`` with rotary ``variants``
        [tokens]: keys and values written to ``meta.slots``; returns float32 logits
        [len(meta.last_index), vocab]."""
        ...

    def decode(
        self, tokens: torch.Tensor, variants: torch.Tensor, cache: PagedKVCache,
        meta: DecodeMeta,
    ) -> torch.Tensor:
        """One token per row at ``meta.positions``; float32 logits [rows, vocab]. Tensor
        shapes depend only on the row count (and the sdpa backend's ``kv_len``)."""
        ...

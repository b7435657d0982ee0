"""Qwen2-Audio as an engine model: audio tower + projector + Qwen2 decoder + lm_head,
loaded from the checkpoint's weight files by name (``audio_tower.*``,
``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from torch import nn

from oai_audio_server.audio.types import AudioSegmentFeatures
from oai_audio_server.models.attention import DecodeMeta, PrefillMeta
from oai_audio_server.models.audio_splice import embed_with_audio
from oai_audio_server.models.base import AudioSpan
from oai_audio_server.models.common import load_named_weights
from oai_audio_server.models.kv_cache import KVLayout, PagedKVCache
from oai_audio_server.models.qwen2_audio.audio_encoder import Projector, Qwen2AudioTower
from oai_audio_server.models.qwen2_audio.config import Qwen2AudioConfig
from oai_audio_server.models.qwen2_audio.decoder import Qwen2Decoder, rotary_tables

LM_HEAD = "language_model.lm_head.weight"
EMBED = "language_model.model.embed_tokens.weight"


class LanguageModel(nn.Module):
    def __init__(self, config: Qwen2AudioConfig) -> None:
        super().__init__()
        self.model = Qwen2Decoder(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)


class Qwen2AudioModel(nn.Module):
    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, config: Qwen2AudioConfig, max_len: int) -> None:
        super().__init__()
        self.config = config
        self.max_len = max_len
        self.audio_tower = Qwen2AudioTower(config.audio)
        self.multi_modal_projector = Projector(config.audio.d_model, config.text.hidden_size)
        self.language_model = LanguageModel(config)
        cos, sin = rotary_tables(config.text, max_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @classmethod
    def load(
        cls, model_dir: Path, config: Qwen2AudioConfig, *, max_len: int,
        device: torch.device, dtype: torch.dtype, random_weights: bool = False,
    ) -> Qwen2AudioModel:
        """Built on the meta device; every parameter is then the checkpoint's tensor."""
        with torch.device("meta"):
            model = cls(config, max_len)
        tied = {LM_HEAD: EMBED} if config.text.tie_word_embeddings else {}
        load_named_weights(model, model_dir, family="Qwen2-Audio", device=device, dtype=dtype,
                           aliases=tied, random_weights=random_weights)
        cos, sin = rotary_tables(config.text, max_len)
        model.cos, model.sin = cos.to(device), sin.to(device)
        model.requires_grad_(False).eval()
        model.language_model.model.fuse()
        return model

    @property
    def kv_layout(self) -> KVLayout:
        text = self.config.text
        return KVLayout(
            layers=text.num_hidden_layers,
            heads=text.num_key_value_heads,
            head_dim=text.head_dim,
            dtype=self.language_model.lm_head.weight.dtype,
        )

    def audio_embeddings(self, segments: Sequence[AudioSegmentFeatures]) -> list[torch.Tensor]:
        """One [token_count, hidden] tensor per segment; all segments in one batch."""
        mels = torch.stack([s.mel for s in segments]).to(self.cos.device)
        pooled = self.audio_tower(mels, [s.length_after_cnn for s in segments])
        projected = self.multi_modal_projector(pooled)
        return [projected[i, : s.token_count] for i, s in enumerate(segments)]

    def rotary_variant(self, prompt_len: int) -> int:
        return 0  # one rotary table whatever the length

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.language_model.model.embed_tokens(ids))

    def audio_spans(
        self, prompt: Sequence[int], audio: Sequence[AudioSegmentFeatures]
    ) -> list[AudioSpan]:
        """The ``<|AUDIO|>`` tokens, taken in order: each segment's ``token_count`` of
        them, one run of consecutive positions per segment."""
        audio_id = self.config.audio_token_id
        positions = [i for i, token in enumerate(prompt) if token == audio_id]
        expected = sum(s.token_count for s in audio)
        if len(positions) != expected:
            raise ValueError(
                f"prompt has {len(positions)} audio tokens but its audios give {expected}"
            )
        spans = []
        taken = 0
        for segment in audio:
            run = positions[taken : taken + segment.token_count]
            taken += segment.token_count
            if run and run[-1] - run[0] + 1 != len(run):
                raise ValueError("an audio's tokens in the prompt are not consecutive")
            if run:
                spans.append(AudioSpan(run[0], run[-1] + 1))
            else:
                spans.append(AudioSpan(taken, taken))
        return spans

    def embed_prompts(
        self,
        prompts: Sequence[Sequence[int]],
        audio: Sequence[Sequence[AudioSegmentFeatures]],
        starts: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """Token embeddings [len - start, hidden] of each prompt from its ``start``; each
        run of ``<|AUDIO|>`` tokens replaced by its audio's embeddings (the audios that
        reach past ``start``, in one encoder batch)."""
        return embed_with_audio(
            self.embed_tokens, self.cos.device, prompts, audio, starts, self.audio_spans,
            lambda segments, _spans: self.audio_embeddings(segments),
        )

    def prefill(
        self, embeds: torch.Tensor, positions: torch.Tensor, variants: torch.Tensor,
        cache: PagedKVCache, meta: PrefillMeta,
    ) -> torch.Tensor:
        hidden = self.language_model.model(
            embeds, self.cos[positions], self.sin[positions], cache, meta
        )
        return self.language_model.lm_head(hidden[meta.last_index]).float()

    def decode(
        self, tokens: torch.Tensor, variants: torch.Tensor, cache: PagedKVCache,
        meta: DecodeMeta,
    ) -> torch.Tensor:
        embeds = self.embed_tokens(tokens)
        meta = meta.prepared(embeds.dtype)
        positions = meta.positions
        hidden = self.language_model.model(
            embeds, self.cos[positions], self.sin[positions], cache, meta
        )
        return self.language_model.lm_head(hidden).float()

"""Qwen2-Audio as an engine model: audio tower + projector + Qwen2 decoder + lm_head,
loaded from the checkpoint's weight files by name (``audio_tower.*``,
``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from oai_audio_server.audio.types import AudioSegmentFeatures
from oai_audio_server.engine.kv_cache import KVLayout, SlotKVCache
from oai_audio_server.models.common import (
    last_positions,
    load_named_weights,
    right_padded,
    visible_positions,
)
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
        device: torch.device, dtype: torch.dtype,
    ) -> Qwen2AudioModel:
        """Built on the meta device; every parameter is then the checkpoint's tensor."""
        with torch.device("meta"):
            model = cls(config, max_len)
        tied = {LM_HEAD: EMBED} if config.text.tie_word_embeddings else {}
        load_named_weights(model, model_dir, family="Qwen2-Audio", device=device, dtype=dtype,
                           aliases=tied)
        cos, sin = rotary_tables(config.text, max_len)
        model.cos, model.sin = cos.to(device), sin.to(device)
        return model.requires_grad_(False).eval()

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

    def _embed_prompts(
        self,
        prompts: Sequence[Sequence[int]],
        audio: Sequence[Sequence[AudioSegmentFeatures]],
    ) -> torch.Tensor:
        """Token embeddings [rows, longest, hidden] (right-padded); each run of
        ``<|AUDIO|>`` tokens replaced by its audio's embeddings, in order."""
        device = self.cos.device
        embeds = self.language_model.model.embed_tokens(right_padded(prompts, device))
        segments = [segment for row_audio in audio for segment in row_audio]
        if not segments:
            return embeds
        spans = iter(self.audio_embeddings(segments))
        audio_id = self.config.audio_token_id
        for row, (prompt, row_audio) in enumerate(zip(prompts, audio, strict=True)):
            positions = [i for i, token in enumerate(prompt) if token == audio_id]
            expected = sum(s.token_count for s in row_audio)
            if len(positions) != expected:
                raise ValueError(
                    f"prompt has {len(positions)} audio tokens but its audios give {expected}"
                )
            if positions:
                row_spans = [next(spans) for _ in row_audio]
                index = torch.tensor(positions, device=device)
                embeds[row, index] = torch.cat(row_spans).to(embeds.dtype)
        return embeds

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        audio: Sequence[Sequence[AudioSegmentFeatures]],
        slots: Sequence[int],
        cache: SlotKVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.cos.device
        lengths = [len(p) for p in prompts]
        embeds = self._embed_prompts(prompts, audio)
        longest = embeds.shape[1]
        cos = self.cos[:longest][None, :, None, :]
        sin = self.sin[:longest][None, :, None, :]
        slot_index = torch.tensor(list(slots), device=device)
        hidden = self.language_model.model.prefill(
            embeds, cos, sin, cache.keys, cache.values, slot_index
        )
        state = torch.zeros(len(prompts), dtype=torch.long, device=device)
        return self.language_model.lm_head(last_positions(hidden, lengths)).float(), state

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        row_state: torch.Tensor,
        cache: SlotKVCache,
        kv_len: int,
    ) -> torch.Tensor:
        cos = self.cos[positions][:, None, None, :]
        sin = self.sin[positions][:, None, None, :]
        hidden = self.language_model.model.decode(
            tokens, cos, sin, cache.keys, cache.values, positions,
            visible_positions(positions, kv_len),
        )
        return self.language_model.lm_head(hidden).float()

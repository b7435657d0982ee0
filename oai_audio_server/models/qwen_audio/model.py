"""Qwen-Audio(-Chat) as an engine model: audio encoder + QWen decoder + lm_head, loaded
from the checkpoint's weight files by name."""

from __future__ import annotations

import logging
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
from oai_audio_server.models.qwen_audio.config import QwenAudioConfig
from oai_audio_server.models.qwen_audio.decoder import QwenDecoder, RotaryTables

logger = logging.getLogger(__name__)

# Buffers that some checkpoints store and others leave to the code (fixed sinusoids).
_OPTIONAL = frozenset({"transformer.audio.positional_embedding"})


class QwenAudioModel(nn.Module):
    def __init__(self, config: QwenAudioConfig, max_len: int) -> None:
        super().__init__()
        self.config = config
        self.max_len = max_len
        self.transformer = QwenDecoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryTables(config, max_len)

    @classmethod
    def load(
        cls, model_dir: Path, config: QwenAudioConfig, *, max_len: int,
        device: torch.device, dtype: torch.dtype,
    ) -> QwenAudioModel:
        """Built without memory (meta tensors), then every parameter is the checkpoint's
        tensor, moved to ``device`` as ``dtype``: no random initialisation of 8 B
        parameters, no second copy."""
        with torch.device("meta"):
            model = cls(config, max_len)
        loaded = load_named_weights(model, model_dir, family="Qwen-Audio", device=device,
                                    dtype=dtype, optional=_OPTIONAL)
        # What the checkpoint did not hold is computed here (never random).
        with torch.device(device):
            fresh = RotaryTables(config, max_len)
        model.rotary = fresh
        if "transformer.audio.positional_embedding" not in loaded:
            from oai_audio_server.models.qwen_audio.audio_encoder import sinusoids

            model.transformer.audio.positional_embedding = sinusoids(
                config.audio.n_ctx, config.audio.n_state
            ).to(device=device, dtype=dtype)
        # Inference only: no autograd state on the weights (nor in captured graphs).
        return model.requires_grad_(False).eval()

    @property
    def kv_layout(self) -> KVLayout:
        return KVLayout(
            layers=self.config.num_hidden_layers,
            heads=self.config.num_attention_heads,
            head_dim=self.config.head_dim,
            dtype=self.lm_head.weight.dtype,
        )

    def _embed_prompts(
        self,
        prompts: Sequence[Sequence[int]],
        audio: Sequence[Sequence[AudioSegmentFeatures]],
    ) -> torch.Tensor:
        """Token embeddings [rows, longest, hidden] (right-padded), each ``<audio>`` ...
        ``</audio>`` span replaced by its audio's encoder output. All audios of all rows
        go through the encoder as one batch."""
        embeds = self.transformer.wte(right_padded(prompts, self.lm_head.weight.device))
        segments = [segment for row_audio in audio for segment in row_audio]
        if not segments:
            return embeds
        mels = torch.stack([s.mel for s in segments])
        group = [
            max(s.length_after_cnn for s in row_audio) for row_audio in audio for _ in row_audio
        ]
        spans = self.transformer.audio(
            mels, [s.length_after_cnn for s in segments], [s.token_count for s in segments],
            group,
        )
        start_id = self.config.audio.audio_start_id
        index = 0
        for row, (prompt, row_audio) in enumerate(zip(prompts, audio, strict=True)):
            starts = [i for i, token in enumerate(prompt) if token == start_id]
            if len(starts) != len(row_audio):
                raise ValueError(
                    f"prompt has {len(starts)} audio spans but {len(row_audio)} audios"
                )
            for start in starts:
                span = spans[index]
                index += 1
                if prompt[start + len(span) - 1] != start_id + 1:
                    raise ValueError("an audio span in the prompt does not match its audio")
                embeds[row, start : start + len(span)] = span.to(embeds.dtype)
        return embeds

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        audio: Sequence[Sequence[AudioSegmentFeatures]],
        slots: Sequence[int],
        cache: SlotKVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.lm_head.weight.device
        lengths = [len(p) for p in prompts]
        embeds = self._embed_prompts(prompts, audio)
        longest = embeds.shape[1]
        state = torch.tensor([self.rotary.alpha_index(n) for n in lengths], device=device)
        positions = torch.arange(longest, device=device)[None, :].expand(len(prompts), -1)
        cos, sin, logn = self.rotary.lookup(state, positions)
        slot_index = torch.tensor(list(slots), device=device)
        hidden = self.transformer.prefill(
            embeds, cos, sin, logn, cache.keys, cache.values, slot_index
        )
        return self.lm_head(last_positions(hidden, lengths)).float(), state

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        row_state: torch.Tensor,
        cache: SlotKVCache,
        kv_len: int,
    ) -> torch.Tensor:
        cos, sin, logn = self.rotary.lookup(row_state, positions[:, None])
        hidden = self.transformer.decode(
            tokens, cos, sin, logn, cache.keys, cache.values, positions,
            visible_positions(positions, kv_len),
        )
        return self.lm_head(hidden).float()

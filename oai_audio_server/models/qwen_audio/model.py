"""Qwen-Audio(-Chat) as an engine model: audio encoder + QWen decoder + lm_head, loaded
from the checkpoint's weight files by name."""

from __future__ import annotations

import logging
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
        device: torch.device, dtype: torch.dtype, random_weights: bool = False,
    ) -> QwenAudioModel:
        """Built without memory (meta tensors), then every parameter is the checkpoint's
        tensor, moved to ``device`` as ``dtype``: no random initialisation of 8 B
        parameters, no second copy."""
        with torch.device("meta"):
            model = cls(config, max_len)
        loaded = load_named_weights(model, model_dir, family="Qwen-Audio", device=device,
                                    dtype=dtype, optional=_OPTIONAL,
                                    random_weights=random_weights)
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
        model.requires_grad_(False).eval()
        model.fuse()
        return model

    def fuse(self) -> None:
        """The MLP's two input projections as one matrix (see layers.fuse_linears)."""
        for block in self.transformer.blocks():
            block.mlp.fuse()

    @property
    def kv_layout(self) -> KVLayout:
        return KVLayout(
            layers=self.config.num_hidden_layers,
            heads=self.config.num_attention_heads,
            head_dim=self.config.head_dim,
            dtype=self.lm_head.weight.dtype,
        )

    def rotary_variant(self, prompt_len: int) -> int:
        """The dynamic-NTK table a row uses for all its positions, chosen by its prompt's
        length (as the official code does for one sequence)."""
        return self.rotary.alpha_index(prompt_len)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.transformer.wte(ids))

    def audio_spans(
        self, prompt: Sequence[int], audio: Sequence[AudioSegmentFeatures]
    ) -> list[AudioSpan]:
        """Each ``<audio>`` ... ``</audio>`` span (the tags are the encoder's output too).
        Every audio of a prompt is cut at the prompt's longest audio (the official code's
        batch), so that length is each span's context."""
        start_id = self.config.audio.audio_start_id
        starts = [i for i, token in enumerate(prompt) if token == start_id]
        if len(starts) != len(audio):
            raise ValueError(f"prompt has {len(starts)} audio spans but {len(audio)} audios")
        group = max((s.length_after_cnn for s in audio), default=0)
        spans = []
        for start, segment in zip(starts, audio, strict=True):
            end = start + segment.token_count + 2
            if end > len(prompt) or prompt[end - 1] != start_id + 1:
                raise ValueError("an audio span in the prompt does not match its audio")
            spans.append(AudioSpan(start, end, group))
        return spans

    def embed_prompts(
        self,
        prompts: Sequence[Sequence[int]],
        audio: Sequence[Sequence[AudioSegmentFeatures]],
        starts: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """Token embeddings [len - start, hidden] of each prompt from its ``start``, each
        ``<audio>`` ... ``</audio>`` span replaced by its audio's encoder output. The
        audios that reach past ``start``, of all prompts, go through the encoder as one
        batch."""
        def encode(
            segments: list[AudioSegmentFeatures], spans: list[AudioSpan]
        ) -> Sequence[torch.Tensor]:
            return self.transformer.audio(
                torch.stack([s.mel for s in segments]),
                [s.length_after_cnn for s in segments], [s.token_count for s in segments],
                [span.context for span in spans],
            )

        return embed_with_audio(self.embed_tokens, self.lm_head.weight.device, prompts, audio,
                                starts, self.audio_spans, encode)

    def prefill(
        self, embeds: torch.Tensor, positions: torch.Tensor, variants: torch.Tensor,
        cache: PagedKVCache, meta: PrefillMeta,
    ) -> torch.Tensor:
        """Packed prompt chunks [tokens, hidden] -> float32 logits of the tokens at
        ``meta.last_index``."""
        rope = self.rotary.rope(variants, positions, self.config.num_attention_heads)
        hidden = self.transformer(embeds, rope, cache, meta)
        return self.lm_head(hidden[meta.last_index]).float()

    def decode(
        self, tokens: torch.Tensor, variants: torch.Tensor, cache: PagedKVCache,
        meta: DecodeMeta,
    ) -> torch.Tensor:
        """One token per row -> float32 logits [rows, vocab]. Shapes depend only on the
        row count (and, for the sdpa backend, ``meta.kv_len``): capturable in a graph."""
        embeds = self.embed_tokens(tokens)
        meta = meta.prepared(embeds.dtype)
        rope = self.rotary.rope(variants, meta.positions, self.config.num_attention_heads)
        return self.lm_head(self.transformer(embeds, rope, cache, meta)).float()

"""Qwen-Audio's audio encoder: a Whisper-style encoder with pooling and a projection
into the decoder's embedding space.

80 x 3000 log-mel -> conv (k3, s1) -> GELU -> conv (k3, s2) -> GELU -> + sinusoidal
positions -> pre-norm transformer blocks -> average pool (2) -> LayerNorm -> Linear.
Each audio's span in the prompt is ``<audio>`` + its pooled frames + ``</audio>``, the two
tags embedded by ``audio_bos_eos_token``. Parameter names follow the checkpoint's
(``transformer.audio.*``).

Audios of different lengths run as one batch: frames past an audio's own length are
zeroed and masked as keys. The official code encodes the audios of one prompt together
and cuts their mels at twice the longest one's frames, so the last convolution frames of
a shorter audio see mel frames past its end; ``group_frames`` gives each audio the
longest length of its own prompt, and mel frames past it are zeroed, so each prompt's
audio features are the ones it gets when encoded alone, whatever else is in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from oai_audio_server.models.qwen_audio.config import AudioEncoderConfig


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positions: sin of each frequency, then cos, [length, channels]."""
    half = channels // 2
    step = math.log(max_timescale) / (half - 1)
    inv_timescales = torch.exp(-step * torch.arange(half))
    scaled = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


class EncoderAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        batch, frames, width = x.shape
        shape = (batch, frames, self.n_head, width // self.n_head)
        q, k, v = (
            proj(x).view(shape).transpose(1, 2) for proj in (self.query, self.key, self.value)
        )
        # Scaled by 1/sqrt(head dim), as Whisper's q*d^-1/4 times k*d^-1/4 is.
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.out(attended.transpose(1, 2).reshape(batch, frames, width))


class EncoderBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.attn = EncoderAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.mlp = nn.Sequential(
            nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state)
        )
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), key_mask)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    positional_embedding: torch.Tensor

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        n_state = config.n_state
        self.conv1 = nn.Conv1d(config.n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(config.n_ctx, n_state))
        self.blocks = nn.ModuleList(
            EncoderBlock(n_state, config.n_head) for _ in range(config.n_layer)
        )
        self.ln_post = nn.LayerNorm(n_state)
        self.avg_pool = config.avg_pool
        self.proj = nn.Linear(n_state, config.output_dim)
        self.audio_bos_eos_token = (
            nn.Embedding(2, config.output_dim) if config.add_audio_bos_eos_token else None
        )

    def forward(
        self, mels: torch.Tensor, frames: Sequence[int], tokens: Sequence[int],
        group_frames: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """``mels`` [N, n_mels, 3000]; ``frames``: each audio's length after the convs;
        ``tokens``: its pooled frames; ``group_frames``: the longest ``frames`` among the
        audios of its prompt (default: of the whole batch). Returns each audio's span
        embeddings [tokens + 2 (with the tags), output_dim]."""
        weight = self.conv1.weight
        longest = max(frames)
        x = mels.to(device=weight.device, dtype=weight.dtype)[:, :, : 2 * longest]
        if group_frames is not None and min(group_frames) < longest:
            cut = torch.tensor([2 * g for g in group_frames], device=x.device)
            beyond = torch.arange(x.shape[-1], device=x.device)[None, :] >= cut[:, None]
            x = x.masked_fill(beyond[:, None, :], 0.0)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [N, longest, n_state]
        x = x + self.positional_embedding[:longest].to(x.dtype)
        key_mask = None
        if min(frames) < longest:
            lengths = torch.tensor(list(frames), device=x.device)
            padded = torch.arange(longest, device=x.device)[None, :] >= lengths[:, None]
            x = x.masked_fill(padded[:, :, None], 0.0)
            key_mask = ~padded[:, None, None, :]
        for block in self.blocks:
            x = block(x, key_mask)
        if self.avg_pool:
            x = F.avg_pool1d(x.transpose(1, 2), kernel_size=2, stride=2).transpose(1, 2)
        x = self.proj(self.ln_post(x))
        spans = []
        for i, count in enumerate(tokens):
            span = x[i, :count]
            if self.audio_bos_eos_token is not None:
                tags = self.audio_bos_eos_token.weight.to(span.dtype)
                span = torch.cat([tags[:1], span, tags[1:]])
            spans.append(span)
        return spans

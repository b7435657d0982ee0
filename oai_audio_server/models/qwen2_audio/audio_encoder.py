"""Qwen2-Audio's audio tower and projector, by the checkpoint's tensor names.

``audio_tower``: two GELU convolutions (the second with stride 2) over the [mels, 3000]
log-mel, learned positions (``embed_positions``), pre-norm transformer blocks whose
attention only sees the audio's own frames (the padding frames of the 30 s window are
masked as keys), 2x average pooling, a final LayerNorm. ``multi_modal_projector.linear``
maps each pooled frame to the decoder's width: one embedding per ``<|AUDIO|>`` token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from oai_audio_server.models.qwen2_audio.config import Qwen2AudioEncoderConfig


class EncoderAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """``key_mask`` [rows, 1, 1, frames]: True where a key may be attended."""
        rows, frames, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(rows, frames, self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
            attn_mask=key_mask,
        )
        return self.out_proj(out.transpose(1, 2).reshape(rows, frames, width))


class EncoderLayer(nn.Module):
    def __init__(self, config: Qwen2AudioEncoderConfig) -> None:
        super().__init__()
        width = config.d_model
        self.self_attn_layer_norm = nn.LayerNorm(width)
        self.self_attn = EncoderAttention(width, config.encoder_attention_heads)
        self.final_layer_norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class Qwen2AudioTower(nn.Module):
    def __init__(self, config: Qwen2AudioEncoderConfig) -> None:
        super().__init__()
        if config.activation_function != "gelu":
            raise ValueError(f"unsupported audio activation {config.activation_function!r}")
        width = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(width, width, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, width)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(width)

    def forward(self, mels: torch.Tensor, frames_after_cnn: Sequence[int]) -> torch.Tensor:
        """[audios, mels, 3000] -> pooled states [audios, 750, d_model]."""
        dtype = self.conv1.weight.dtype
        x = F.gelu(self.conv1(mels.to(dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.embed_positions.weight[: x.shape[1]]
        lengths = torch.tensor(list(frames_after_cnn), device=x.device)
        visible = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        key_mask = visible[:, None, None, :]
        for layer in self.layers:
            x = cast(EncoderLayer, layer)(x, key_mask)
        x = F.avg_pool1d(x.transpose(1, 2), kernel_size=2, stride=2).transpose(1, 2)
        return cast(torch.Tensor, self.layer_norm(x))


class Projector(nn.Module):
    def __init__(self, audio_width: int, text_width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(audio_width, text_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.linear(x))

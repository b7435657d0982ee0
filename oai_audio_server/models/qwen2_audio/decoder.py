"""The Qwen2 decoder of Qwen2-Audio, written against the paged KV cache.

Per layer: RMSNorm -> q/k/v projections (with biases) -> rotary embedding (base
``rope_theta``, no length-dependent scaling) -> attention (grouped-query when the config
has fewer key/value heads) -> ``o_proj``; then RMSNorm -> SwiGLU MLP
(``down(silu(gate(x)) * up(x))``). Names follow the checkpoint
(``language_model.model.layers.N.self_attn.q_proj`` ...); after loading, q/k/v and
gate/up each run as one matrix.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from oai_audio_server.models.attention import AttentionMeta, attend
from oai_audio_server.models.kv_cache import PagedKVCache
from oai_audio_server.models.layers import RMSNorm, fuse_linears, rotate_qk
from oai_audio_server.models.qwen2_audio.config import Qwen2TextConfig


def rotary_tables(config: Qwen2TextConfig, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, head_dim] in float32."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


class SelfAttention(nn.Module):
    def __init__(self, config: Qwen2TextConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)
        self.qkv: nn.Linear | None = None  # q, k and v as one matrix, after fuse()

    def fuse(self) -> None:
        self.qkv = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        cache_layer: torch.Tensor, meta: AttentionMeta,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        if self.qkv is not None:
            projected = self.qkv(x)
        else:
            projected = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        heads = projected.view(tokens, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k = rotate_qk(heads[:, : self.heads + self.kv_heads], cos, sin, self.heads)
        out = attend(q, k, heads[:, self.heads + self.kv_heads :], cache_layer, meta, None)
        return cast(torch.Tensor, self.o_proj(out.reshape(tokens, -1)))


class MLP(nn.Module):
    def __init__(self, config: Qwen2TextConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}")
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up: nn.Linear | None = None  # after fuse()

    def fuse(self) -> None:
        self.gate_up = fuse_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return cast(torch.Tensor, self.down_proj(F.silu(gate) * up))


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
        sin: torch.Tensor, cache_layer: torch.Tensor, meta: AttentionMeta,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sub-layer output, residual stream); each residual add fused with the next norm."""
        normed, residual = self.input_layernorm.add_forward(x, residual)
        attended = self.self_attn(normed, cos, sin, cache_layer, meta)
        normed, residual = self.post_attention_layernorm.add_forward(attended, residual)
        return self.mlp(normed), residual


class Qwen2Decoder(nn.Module):
    """``language_model.model``: ``embed_tokens``, ``layers``, ``norm``."""

    def __init__(self, config: Qwen2TextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def blocks(self) -> list[DecoderLayer]:
        return [cast(DecoderLayer, layer) for layer in self.layers]

    def fuse(self) -> None:
        for layer in self.blocks():
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def forward(
        self, embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        cache: PagedKVCache, meta: AttentionMeta,
    ) -> torch.Tensor:
        """Token-major hidden states [tokens, hidden] after the final norm."""
        x, residual = embeds, None
        for index, layer in enumerate(self.blocks()):
            x, residual = layer(x, residual, cos, sin, cache.layer(index), meta)
        return self.norm.add_forward(x, residual)[0]

"""The Qwen2 decoder of Qwen2-Audio, written against the engine's slot KV cache.

Per layer: RMSNorm -> q/k/v projections (with biases) -> rotary embedding (base
``rope_theta``, no length-dependent scaling) -> attention (grouped-query when the config
has fewer key/value heads) -> ``o_proj``; then RMSNorm -> SwiGLU MLP
(``down(silu(gate(x)) * up(x))``). Names follow the checkpoint
(``language_model.model.layers.N.self_attn.q_proj`` ...).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from oai_audio_server.models.qwen2_audio.config import Qwen2TextConfig
from oai_audio_server.models.qwen_audio.decoder import RMSNorm, rotate


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

    def _qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [rows, heads, tokens, d]; k, v [rows, kv_heads, tokens, d]; q, k rotated."""
        rows, tokens, _ = x.shape
        q = self.q_proj(x).view(rows, tokens, self.heads, self.head_dim)
        k = self.k_proj(x).view(rows, tokens, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(rows, tokens, self.kv_heads, self.head_dim)
        return (
            rotate(q, cos, sin).transpose(1, 2),
            rotate(k, cos, sin).transpose(1, 2),
            v.transpose(1, 2),
        )

    def _widen(self, t: torch.Tensor) -> torch.Tensor:
        """Key/value heads repeated for their query heads (grouped-query attention)."""
        groups = self.heads // self.kv_heads
        return t if groups == 1 else t.repeat_interleave(groups, dim=1)

    def _out(self, attended: torch.Tensor) -> torch.Tensor:
        rows, _, tokens, _ = attended.shape
        return cast(torch.Tensor, self.o_proj(attended.transpose(1, 2).reshape(rows, tokens, -1)))

    def prefill(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
    ) -> torch.Tensor:
        q, k, v = self._qkv(x, cos, sin)
        tokens = x.shape[1]
        keys[slots, :, :tokens] = k
        values[slots, :, :tokens] = v
        out = F.scaled_dot_product_attention(q, self._widen(k), self._widen(v), is_causal=True)
        return self._out(out)

    def decode(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
        visible: torch.Tensor,
    ) -> torch.Tensor:
        q, k, v = self._qkv(x, cos, sin)
        rows = x.shape[0]
        index = torch.arange(rows, device=x.device)
        keys[index, :, positions] = k[:, :, 0]
        values[index, :, positions] = v[:, :, 0]
        kv_len = visible.shape[-1]
        out = F.scaled_dot_product_attention(
            q, self._widen(keys[:rows, :, :kv_len]), self._widen(values[:rows, :, :kv_len]),
            attn_mask=visible,
        )
        return self._out(out)


class MLP(nn.Module):
    def __init__(self, config: Qwen2TextConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}")
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Decoder(nn.Module):
    """``language_model.model``: ``embed_tokens``, ``layers``, ``norm``."""

    def __init__(self, config: Qwen2TextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def blocks(self) -> list[DecoderLayer]:
        return [cast(DecoderLayer, layer) for layer in self.layers]

    def prefill(
        self, embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
    ) -> torch.Tensor:
        x = embeds
        for index, layer in enumerate(self.blocks()):
            attended = layer.self_attn.prefill(
                layer.input_layernorm(x), cos, sin, keys[index], values[index], slots
            )
            x = layer.finish(x, attended)
        return cast(torch.Tensor, self.norm(x))

    def decode(
        self, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
        visible: torch.Tensor,
    ) -> torch.Tensor:
        x = self.embed_tokens(tokens)[:, None, :]
        for index, layer in enumerate(self.blocks()):
            attended = layer.self_attn.decode(
                layer.input_layernorm(x), cos, sin, keys[index], values[index], positions,
                visible,
            )
            x = layer.finish(x, attended)
        return cast(torch.Tensor, self.norm(x))[:, 0]

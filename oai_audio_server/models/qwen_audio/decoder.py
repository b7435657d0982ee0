"""The QWen decoder of Qwen-Audio(-Chat), written against the paged KV cache.

Per block: RMSNorm -> fused qkv projection -> rotary embedding -> log-n query scaling ->
attention -> output projection, then RMSNorm -> SwiGLU MLP (``w1 * silu(w2)``).
Parameter names follow the checkpoint (``transformer.h.N.attn.c_attn`` ...).

Length-dependent parts, as the official code computes them for one sequence:

* dynamic NTK: the rotary base is stretched by an alpha chosen from the prompt's length
  (1 up to ``seq_length`` tokens, then 3, 7, 15, ... per doubling) and kept for every
  token generated after it;
* log-n scaling: the query at position p is scaled by log(p + 1) / log(seq_length)
  once p + 1 exceeds ``seq_length``.

Here both come from each row's own length and positions, so rows of any lengths share a
batch and each gets exactly what it would get alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from oai_audio_server.models.attention import AttentionMeta, attend
from oai_audio_server.models.kv_cache import PagedKVCache
from oai_audio_server.models.layers import RMSNorm, fuse_linears, query_key_scale, rotate_qk
from oai_audio_server.models.qwen_audio.audio_encoder import AudioEncoder
from oai_audio_server.models.qwen_audio.config import QwenAudioConfig


def ntk_alpha(prompt_len: int, seq_length: int) -> int:
    context = math.log(prompt_len / seq_length, 2) + 1
    return max(2 ** math.ceil(context) - 1, 1)


class Attention(nn.Module):
    def __init__(self, config: QwenAudioConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.head_dim
        width = self.heads * self.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * width)
        self.c_proj = nn.Linear(width, config.hidden_size, bias=not config.no_bias)
        self.scale = None if config.scale_attn_weights else 1.0

    def forward(
        self, x: torch.Tensor, rope: Rope, cache_layer: torch.Tensor, meta: AttentionMeta
    ) -> torch.Tensor:
        """``x`` [tokens, hidden] -> [tokens, hidden]; this pass's keys and values go to
        the cache slots ``meta`` names."""
        tokens = x.shape[0]
        qkv = self.c_attn(x).view(tokens, 3 * self.heads, self.head_dim)
        q, k = rotate_qk(qkv[:, : 2 * self.heads], rope.cos, rope.sin, self.heads, rope.qk_scale)
        out = attend(q, k, qkv[:, 2 * self.heads :], cache_layer, meta, self.scale)
        return cast(torch.Tensor, self.c_proj(out.reshape(tokens, -1)))


class MLP(nn.Module):
    def __init__(self, config: QwenAudioConfig) -> None:
        super().__init__()
        inner = config.intermediate_size // 2
        bias = not config.no_bias
        self.w1 = nn.Linear(config.hidden_size, inner, bias=bias)
        self.w2 = nn.Linear(config.hidden_size, inner, bias=bias)
        self.c_proj = nn.Linear(inner, config.hidden_size, bias=bias)
        self.w12: nn.Linear | None = None  # w1 and w2 as one matrix, after fuse()

    def fuse(self) -> None:
        self.w12 = fuse_linears(self.w1, self.w2)
        del self.w1, self.w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w12 is not None:
            up, gate = self.w12(x).chunk(2, dim=-1)
        else:
            up, gate = self.w1(x), self.w2(x)
        return cast(torch.Tensor, self.c_proj(up * F.silu(gate)))


class Block(nn.Module):
    def __init__(self, config: QwenAudioConfig) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, rope: Rope,
        cache_layer: torch.Tensor, meta: AttentionMeta,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sub-layer output, residual stream): each residual add is fused with the norm
        that follows it."""
        normed, residual = self.ln_1.add_forward(x, residual)
        attended = self.attn(normed, rope, cache_layer, meta)
        normed, residual = self.ln_2.add_forward(attended, residual)
        return self.mlp(normed), residual


@dataclass(frozen=True)
class Rope:
    """Per token: cos, sin [tokens, dim] (float32) and the query heads' log-n scale beside
    ones for the key heads [tokens, 2 * heads, 1] (layers.query_key_scale)."""

    cos: torch.Tensor
    sin: torch.Tensor
    qk_scale: torch.Tensor | None = None


class RotaryTables(nn.Module):
    """cos/sin for every position up to ``max_len`` under every NTK alpha a prompt of at
    most ``max_len`` tokens can get, and the log-n factor of every position. Built once,
    so a decode step only indexes them (no per-step Python, capturable in a graph)."""

    cos: torch.Tensor
    sin: torch.Tensor
    logn: torch.Tensor

    def __init__(self, config: QwenAudioConfig, max_len: int) -> None:
        super().__init__()
        self.seq_length = config.seq_length
        self.dynamic_ntk = config.use_dynamic_ntk
        alphas = (
            sorted({ntk_alpha(n, config.seq_length) for n in range(1, max_len + 1)})
            if self.dynamic_ntk else [1]
        )
        self.alphas = alphas
        dim = config.rotary_dim
        cos, sin = [], []
        for alpha in alphas:
            base = config.rotary_emb_base * alpha ** (dim / (dim - 2))
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
            freqs = torch.outer(torch.arange(max_len).float(), inv_freq)
            angles = torch.cat([freqs, freqs], dim=-1)
            cos.append(angles.cos())
            sin.append(angles.sin())
        self.register_buffer("cos", torch.stack(cos), persistent=False)  # [alphas, len, dim]
        self.register_buffer("sin", torch.stack(sin), persistent=False)
        logn = [
            math.log(p + 1, config.seq_length) if config.use_logn_attn and p + 1 > config.seq_length
            else 1.0
            for p in range(max_len)
        ]
        self.register_buffer("logn", torch.tensor(logn, dtype=torch.float32), persistent=False)

    def alpha_index(self, prompt_len: int) -> int:
        if not self.dynamic_ntk:
            return 0
        return self.alphas.index(ntk_alpha(prompt_len, self.seq_length))

    def rope(self, variants: torch.Tensor, positions: torch.Tensor, heads: int) -> Rope:
        """For tokens at ``positions`` [tokens] under rotary ``variants`` [tokens]."""
        return Rope(
            self.cos[variants, positions], self.sin[variants, positions],
            query_key_scale(self.logn[positions], heads, heads),
        )


class QwenDecoder(nn.Module):
    """``transformer.{wte,h,ln_f}`` and ``lm_head`` of the checkpoint."""

    def __init__(self, config: QwenAudioConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.audio = AudioEncoder(config.audio)

    def blocks(self) -> list[Block]:
        return [cast(Block, block) for block in self.h]

    def forward(
        self, embeds: torch.Tensor, rope: Rope, cache: PagedKVCache, meta: AttentionMeta
    ) -> torch.Tensor:
        """Token-major hidden states [tokens, hidden] after the final norm."""
        x, residual = embeds, None
        for layer, block in enumerate(self.blocks()):
            x, residual = block(x, residual, rope, cache.layer(layer), meta)
        return self.ln_f.add_forward(x, residual)[0]

"""The QWen decoder of Qwen-Audio(-Chat), written against the engine's slot KV cache.

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
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from oai_audio_server.models.qwen_audio.audio_encoder import AudioEncoder
from oai_audio_server.models.qwen_audio.config import QwenAudioConfig


def ntk_alpha(prompt_len: int, seq_length: int) -> int:
    context = math.log(prompt_len / seq_length, 2) + 1
    return max(2 ** math.ceil(context) - 1, 1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first ``cos.shape[-1]`` channels, computed in float32."""
    dim = cos.shape[-1]
    head, rest = x[..., :dim].float(), x[..., dim:].float()
    half = dim // 2
    turned = torch.cat([-head[..., half:], head[..., :half]], dim=-1)
    return torch.cat([head * cos + turned * sin, rest], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: QwenAudioConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.head_dim
        width = self.heads * self.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * width)
        self.c_proj = nn.Linear(width, config.hidden_size, bias=not config.no_bias)
        self.scale = None if config.scale_attn_weights else 1.0

    def _qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, logn: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as [rows, heads, tokens, head_dim], rotated, q scaled by log-n."""
        rows, tokens, _ = x.shape
        q, k, v = self.c_attn(x).view(rows, tokens, 3, self.heads, self.head_dim).unbind(2)
        q = rotate(q, cos, sin) * logn.to(q.dtype)
        k = rotate(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def prefill(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, logn: torch.Tensor,
        keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
    ) -> torch.Tensor:
        """Whole prompts, right-padded to one length; their keys and values go to their
        slots (padding positions too: a decode step overwrites a position before any
        query may see it)."""
        q, k, v = self._qkv(x, cos, sin, logn)
        tokens = x.shape[1]
        keys[slots, :, :tokens] = k
        values[slots, :, :tokens] = v
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.c_proj(out.transpose(1, 2).reshape(x.shape[0], tokens, -1))

    def decode(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, logn: torch.Tensor,
        keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
        visible: torch.Tensor,
    ) -> torch.Tensor:
        """One token per row; row i is slot i. ``visible`` [rows, 1, 1, kv_len] masks
        each row's attention to its own positions."""
        q, k, v = self._qkv(x, cos, sin, logn)
        rows = torch.arange(x.shape[0], device=x.device)
        keys[rows, :, positions] = k[:, :, 0]
        values[rows, :, positions] = v[:, :, 0]
        kv_len = visible.shape[-1]
        out = F.scaled_dot_product_attention(
            q, keys[: x.shape[0], :, :kv_len], values[: x.shape[0], :, :kv_len],
            attn_mask=visible, scale=self.scale,
        )
        return self.c_proj(out.transpose(1, 2).reshape(x.shape[0], 1, -1))


class MLP(nn.Module):
    def __init__(self, config: QwenAudioConfig) -> None:
        super().__init__()
        inner = config.intermediate_size // 2
        bias = not config.no_bias
        self.w1 = nn.Linear(config.hidden_size, inner, bias=bias)
        self.w2 = nn.Linear(config.hidden_size, inner, bias=bias)
        self.c_proj = nn.Linear(inner, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class Block(nn.Module):
    def __init__(self, config: QwenAudioConfig) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        x = x + attended
        return x + self.mlp(self.ln_2(x))


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

    def lookup(
        self, alpha_index: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For positions [rows, tokens]: cos, sin [rows, tokens, 1, dim], logn
        [rows, tokens, 1, 1] (the 1 broadcasts over heads)."""
        rows = alpha_index[:, None].expand_as(positions)
        cos = self.cos[rows, positions][:, :, None, :]
        sin = self.sin[rows, positions][:, :, None, :]
        return cos, sin, self.logn[positions][:, :, None, None]


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

    def prefill(
        self, embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, logn: torch.Tensor,
        keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
    ) -> torch.Tensor:
        x = embeds
        for layer, block in enumerate(self.blocks()):
            attended = block.attn.prefill(
                block.ln_1(x), cos, sin, logn, keys[layer], values[layer], slots
            )
            x = block.finish(x, attended)
        return self.ln_f(x)

    def decode(
        self, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, logn: torch.Tensor,
        keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
        visible: torch.Tensor,
    ) -> torch.Tensor:
        x = self.wte(tokens)[:, None, :]
        for layer, block in enumerate(self.blocks()):
            attended = block.attn.decode(
                block.ln_1(x), cos, sin, logn, keys[layer], values[layer], positions, visible
            )
            x = block.finish(x, attended)
        return self.ln_f(x)[:, 0]

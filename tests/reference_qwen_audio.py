"""An independent, deliberately plain reference of Qwen-Audio-Chat's forward pass for the
tests: one sequence at a time, no KV cache (every step recomputes the whole sequence),
attention by explicit matmuls with a causal mask, rotary tables sliced from a table of
positions 0..L-1, Whisper's attention with q and k each scaled by d^-1/4. It follows the
published model's behaviour as documented (dynamic NTK alpha chosen from the prompt
length and kept while generating; log-n query scaling past seq_length) and names its
parameters as the checkpoint does, so the test checkpoint is built from it.

It is written for the tests and shares no code with the server's model package: the
native engine is checked against it (logits and greedy answers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RefRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


class RefAttn(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.n = c["num_attention_heads"]
        self.d = c["kv_channels"]
        self.c_attn = nn.Linear(c["hidden_size"], 3 * self.n * self.d)
        self.c_proj = nn.Linear(self.n * self.d, c["hidden_size"], bias=False)


class RefMLP(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        ff = c["intermediate_size"] // 2
        self.w1 = nn.Linear(c["hidden_size"], ff, bias=False)
        self.w2 = nn.Linear(c["hidden_size"], ff, bias=False)
        self.c_proj = nn.Linear(ff, c["hidden_size"], bias=False)


class RefBlock(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.ln_1 = RefRMSNorm(c["hidden_size"], c["layer_norm_epsilon"])
        self.attn = RefAttn(c)
        self.ln_2 = RefRMSNorm(c["hidden_size"], c["layer_norm_epsilon"])
        self.mlp = RefMLP(c)


class RefWhisperAttn(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)


class RefWhisperBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = RefWhisperAttn(width)
        self.attn_ln = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.mlp_ln = nn.LayerNorm(width)


def ref_sinusoids(length: int, channels: int) -> torch.Tensor:
    inc = math.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2))
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


class RefAudio(nn.Module):
    def __init__(self, a: dict) -> None:
        super().__init__()
        w = a["n_state"]
        self.heads = a["n_head"]
        self.conv1 = nn.Conv1d(a["n_mels"], w, 3, padding=1)
        self.conv2 = nn.Conv1d(w, w, 3, stride=2, padding=1)
        self.register_buffer("positional_embedding", ref_sinusoids(a["n_ctx"], w))
        self.blocks = nn.ModuleList(RefWhisperBlock(w) for _ in range(a["n_layer"]))
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Linear(w, a["output_dim"])
        self.audio_bos_eos_token = nn.Embedding(2, a["output_dim"])

    def one(self, mel: torch.Tensor, frames: int, tokens: int, prompt_frames: int) -> torch.Tensor:
        """One audio of a prompt whose longest audio has ``prompt_frames``: the mel is cut
        at twice that (as the published code cuts a prompt's batch of audios), the
        frames past the audio's own end dropped: [tokens + 2, output_dim]."""
        x = mel[None, :, : 2 * prompt_frames]
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)[:, :frames]
        x = x + self.positional_embedding[: x.shape[1]]
        for b in self.blocks:
            h = b.attn_ln(x)
            n, t, w = h.shape
            scale = (w // self.heads) ** -0.25
            q = b.attn.query(h).view(n, t, self.heads, -1).permute(0, 2, 1, 3) * scale
            k = b.attn.key(h).view(n, t, self.heads, -1).permute(0, 2, 3, 1) * scale
            v = b.attn.value(h).view(n, t, self.heads, -1).permute(0, 2, 1, 3)
            wts = F.softmax(q @ k, dim=-1)
            x = x + b.attn.out((wts @ v).permute(0, 2, 1, 3).flatten(start_dim=2))
            x = x + b.mlp(b.mlp_ln(x))
        x = F.avg_pool1d(x.permute(0, 2, 1), 2, 2).permute(0, 2, 1)
        x = self.proj(self.ln_post(x))[0, :tokens]
        tags = self.audio_bos_eos_token.weight
        return torch.cat([tags[0:1], x, tags[1:2]])


class RefTransformer(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.wte = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.h = nn.ModuleList(RefBlock(c) for _ in range(c["num_hidden_layers"]))
        self.ln_f = RefRMSNorm(c["hidden_size"], c["layer_norm_epsilon"])
        self.audio = RefAudio(c["audio"])


class ReferenceQwenAudio(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.c = config
        self.transformer = RefTransformer(config)
        self.lm_head = nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)

    def _alpha(self, prompt_len: int) -> float:
        if not self.c.get("use_dynamic_ntk", True):
            return 1.0
        value = math.log(prompt_len / self.c["seq_length"], 2) + 1
        return max(2 ** math.ceil(value) - 1, 1)

    def logits(self, ids: list[int], audio: list[tuple[torch.Tensor, int, int]],
               prompt_len: int | None = None) -> torch.Tensor:
        """Logits [len(ids), vocab] of the whole sequence. ``audio``: (mel, frames,
        tokens) per ``<audio>`` span in order; ``prompt_len`` picks the NTK alpha."""
        c = self.c
        t = self.transformer
        n = len(ids)
        x = t.wte(torch.tensor(ids))
        start = c["audio"]["audio_start_id"]
        spans = [i for i, tok in enumerate(ids) if tok == start]
        assert len(spans) == len(audio)
        x = x.clone()
        longest = max((frames for _, frames, _ in audio), default=0)
        for pos, (mel, frames, tokens) in zip(spans, audio, strict=True):
            emb = t.audio.one(mel, frames, tokens, longest)
            x[pos : pos + len(emb)] = emb
        d = c["kv_channels"]
        alpha = self._alpha(prompt_len or n)
        base = c.get("rotary_emb_base", 10000) * alpha ** (d / (d - 2))
        inv = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
        f = torch.outer(torch.arange(n).float(), inv)
        emb = torch.cat([f, f], dim=-1)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
        seq = c["seq_length"]
        logn = torch.tensor(
            [math.log(p + 1, seq) if c.get("use_logn_attn", True) and p + 1 > seq else 1.0
             for p in range(n)]
        )[:, None, None]

        def rope(v: torch.Tensor) -> torch.Tensor:
            half = v.shape[-1] // 2
            rot = torch.cat([-v[..., half:], v[..., :half]], dim=-1)
            return v * cos + rot * sin

        causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
        heads = c["num_attention_heads"]
        for b in t.h:
            h = b.ln_1(x)
            q, k, v = b.attn.c_attn(h).split(heads * d, dim=-1)
            q, k, v = (z.view(n, heads, d) for z in (q, k, v))
            q = rope(q) * logn
            k = rope(k)
            s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
            s = torch.where(causal, s, torch.finfo(s.dtype).min)
            p = F.softmax(s, dim=-1)
            o = torch.einsum("hqk,khd->qhd", p, v).reshape(n, heads * d)
            x = x + b.attn.c_proj(o)
            h = b.ln_2(x)
            x = x + b.mlp.c_proj(b.mlp.w1(h) * F.silu(b.mlp.w2(h)))
        return self.lm_head(t.ln_f(x))

    @torch.no_grad()
    def greedy(self, ids: list[int], audio, max_new_tokens: int, stop_ids: set[int],
               vocab_limit: int) -> list[int]:
        out: list[int] = []
        seq = list(ids)
        for _ in range(max_new_tokens):
            token = int(self.logits(seq, audio, prompt_len=len(ids))[-1, :vocab_limit].argmax())
            out.append(token)
            if token in stop_ids:
                break
            seq.append(token)
        return out

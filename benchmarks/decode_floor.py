"""The per-step floor of a decoder of the model's shapes: what any engine must at least
do for one decode step, measured on this machine.

Per layer: the qkv projection, scaled-dot-product attention over a KV cache of
``kv_len`` positions, the output projection and the SwiGLU MLP; then the lm_head. Random
weights in the model's dtype, no norms, no rotary, no sampling; on a GPU replayed from a
CUDA graph (the fastest a Python engine can launch it). The serving benchmark prints it
next to the server's measured decode step.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F


def decoder_shape(config: dict[str, Any]) -> dict[str, Any]:
    """The decoder shapes in Qwen-Audio's config keys; a Qwen2-Audio config's
    ``text_config`` is translated (its intermediate_size is the MLP width, Qwen-Audio's is
    twice it; key/value heads are taken as equal to the query heads, as in the 7B)."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        return config
    return {
        "hidden_size": text["hidden_size"],
        "num_attention_heads": text["num_attention_heads"],
        "kv_channels": text["hidden_size"] // text["num_attention_heads"],
        "intermediate_size": 2 * text["intermediate_size"],
        "num_hidden_layers": text["num_hidden_layers"],
        "vocab_size": text["vocab_size"],
    }


def floor_step_ms(
    config: dict[str, Any], batch: int, kv_len: int, device: torch.device,
    dtype: torch.dtype, repeats: int = 20,
) -> float:
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config["kv_channels"]
    inner = config["intermediate_size"] // 2
    layers = config["num_hidden_layers"]
    vocab = config["vocab_size"]

    def weight(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, device=device, dtype=dtype) * 0.02

    weights = [
        (weight(3 * hidden, hidden), weight(hidden, hidden), weight(inner, hidden),
         weight(inner, hidden), weight(hidden, inner))
        for _ in range(layers)
    ]
    head = weight(vocab, hidden)
    keys = torch.randn(layers, batch, heads, kv_len, head_dim, device=device, dtype=dtype)
    values = torch.randn_like(keys)
    x0 = torch.randn(batch, 1, hidden, device=device, dtype=dtype)

    def step() -> torch.Tensor:
        x = x0
        for layer, (qkv, out, w1, w2, proj) in enumerate(weights):
            q, _, _ = F.linear(x, qkv).split(hidden, dim=-1)
            q = q.view(batch, 1, heads, head_dim).transpose(1, 2)
            attended = F.scaled_dot_product_attention(q, keys[layer], values[layer])
            x = x + F.linear(attended.transpose(1, 2).reshape(batch, 1, hidden), out)
            x = x + F.linear(F.linear(x, w1) * F.silu(F.linear(x, w2)), proj)
        return F.linear(x[:, 0], head)

    with torch.inference_mode():
        if device.type == "cuda":
            step()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            graph.replay()
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            for _ in range(repeats):
                graph.replay()
            torch.cuda.synchronize(device)
        else:
            step()
            started = time.perf_counter()
            for _ in range(repeats):
                step()
        elapsed = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return elapsed / repeats * 1000

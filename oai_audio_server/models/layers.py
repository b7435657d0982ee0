"""Layers both model families share, written for one token-major batch [tokens, ...]."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual + x`` (the new residual stream) and its norm: the residual add of
        one sub-layer and the norm of the next, one fused kernel on a GPU."""
        if x.is_cuda:
            from oai_audio_server.models.kernels import triton_available

            if triton_available():
                from oai_audio_server.models.kernels.fused import add_rmsnorm

                return add_rmsnorm(x, residual, self.weight, self.eps)
        summed = x if residual is None else x + residual
        return self(summed), summed


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first ``cos.shape[-1]`` channels, computed in float32."""
    dim = cos.shape[-1]
    head, rest = x[..., :dim].float(), x[..., dim:].float()
    half = dim // 2
    turned = torch.cat([-head[..., half:], head[..., :half]], dim=-1)
    return torch.cat([head * cos + turned * sin, rest], dim=-1).type_as(x)


def query_key_scale(q_scale: torch.Tensor, q_heads: int, k_heads: int) -> torch.Tensor:
    """[tokens, q_heads + k_heads, 1]: each query head's scale (log-n), 1 for the keys.
    Built once per forward pass and shared by every layer."""
    heads = torch.arange(q_heads + k_heads, device=q_scale.device)[None, :, None]
    return torch.where(heads < q_heads, q_scale[:, None, None], 1.0)


def rotate_qk(
    qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_heads: int,
    qk_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys side by side, ``qk`` [tokens, q_heads + k_heads, d], rotated in
    one pass. ``qk_scale`` (see query_key_scale) is folded into the cos and sin: scaling
    commutes with the rotation. ``cos``/``sin``: [tokens, dim] float32."""
    cos_, sin_ = cos[:, None, :], sin[:, None, :]
    if qk_scale is not None:
        cos_, sin_ = cos_ * qk_scale, sin_ * qk_scale
    turned = rotate(qk, cos_, sin_)
    return turned[:, :q_heads], turned[:, q_heads:]


def fuse_linears(*layers: nn.Linear) -> nn.Linear:
    """One projection whose output is the given projections' outputs side by side: one
    matrix multiply instead of several (the checkpoint keeps them apart)."""
    first = layers[0]
    fused = nn.Linear(
        first.in_features, sum(layer.out_features for layer in layers),
        bias=first.bias is not None, device=first.weight.device, dtype=first.weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(torch.cat([layer.weight for layer in layers]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([layer.bias for layer in layers if layer.bias is not None]))
    return fused.requires_grad_(False)

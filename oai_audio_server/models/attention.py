"""Attention over the paged KV cache, for packed prefill chunks and for decode steps.

Every forward pass is token-major: ``q`` is [tokens, heads, head_dim] and a token's key
and value are written to its cache slot before attention reads them back. Two ways to
attend over the blocks of a row:

* ``sdpa`` (every device; the reference the tests compare against): the row's blocks are
  gathered into a contiguous [rows, kv_len, ...] view and PyTorch's scaled-dot-product
  attention runs with an additive mask built once per step;
* ``triton`` (CUDA): one kernel walks each row's own block table up to its own length
  (kernels/paged_attention.py), so no row reads positions it does not have, nothing is
  gathered and no mask exists.

A prefill chunk that starts at position 0 attends over its own fresh keys and values
(causal, no cache read); a later chunk of a long prompt reads the earlier chunks' keys
from the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

AttentionBackend = Literal["sdpa", "triton"]


def slots_of(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of each (row, position): block_tables [rows, blocks], positions [rows]."""
    blocks = block_tables.gather(1, (positions // block_size)[:, None])[:, 0]
    return blocks * block_size + positions % block_size


def store_kv(
    cache_layer: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> None:
    """Write [tokens, kv_heads, head_dim] keys and values into their slots."""
    cache_layer.index_copy_(0, slots, torch.stack([keys, values], dim=1))


def gather_rows(
    cache_layer: torch.Tensor, block_tables: torch.Tensor, kv_len: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the first ``kv_len`` positions (a multiple of the block size)
    of each row, as [rows, kv_heads, kv_len, head_dim]: whole blocks are copied with one
    index_select (on a CPU several times faster than indexing position by position)."""
    rows = block_tables.shape[0]
    blocks = block_tables[:, : kv_len // block_size].reshape(-1)
    per_block = cache_layer.view(-1, block_size, *cache_layer.shape[1:])
    kv = per_block.index_select(0, blocks).view(rows, kv_len, *cache_layer.shape[1:])
    return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)


@dataclass
class DecodeMeta:
    """One token per row. ``positions`` [rows] is where each row's token goes (so the
    row sees positions 0..positions[i]); ``block_tables`` [rows, max_blocks]."""

    block_tables: torch.Tensor
    positions: torch.Tensor
    block_size: int
    kv_len: int  # sdpa: the positions gathered (a multiple of block_size)
    backend: AttentionBackend = "sdpa"
    mask: torch.Tensor | None = None  # sdpa: additive [rows, 1, 1, kv_len], built once
    slot_ids: torch.Tensor | None = None  # [rows], built once

    def prepared(self, dtype: torch.dtype) -> DecodeMeta:
        """The per-step pieces every layer shares, computed once (inside a captured
        graph when the step is one)."""
        self.slot_ids = slots_of(self.block_tables, self.positions, self.block_size)
        if self.backend == "sdpa":
            visible = (
                torch.arange(self.kv_len, device=self.positions.device)[None, :]
                <= self.positions[:, None]
            )
            zero = torch.zeros((), dtype=dtype, device=visible.device)
            masked = torch.full((), float("-inf"), dtype=dtype, device=visible.device)
            self.mask = torch.where(visible, zero, masked)[:, None, None, :]
        return self



@dataclass(frozen=True)
class Chunk:
    """The tokens ``start..start+length`` of one row, packed at ``offset``."""

    start: int
    length: int
    offset: int
    block_table: torch.Tensor  # [blocks] covering start + length positions


@dataclass
class PrefillMeta:
    chunks: Sequence[Chunk]
    slots: torch.Tensor  # [tokens]
    block_size: int
    last_index: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None,
    mask: torch.Tensor | None = None, causal: bool = False,
) -> torch.Tensor:
    """q [rows, heads, n, d], k/v [rows, kv_heads, m, d] (grouped-query when fewer)."""
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
    )


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_layer: torch.Tensor,
    meta: PrefillMeta, scale: float | None,
) -> torch.Tensor:
    """Causal attention of each chunk: q, k, v [tokens, heads, d] packed; -> like q."""
    out = torch.empty_like(q)
    for chunk in meta.chunks:
        span = slice(chunk.offset, chunk.offset + chunk.length)
        query = q[span].transpose(0, 1)[None]
        if chunk.start == 0:
            keys, values = k[span].transpose(0, 1)[None], v[span].transpose(0, 1)[None]
            attended = _sdpa(query, keys, values, scale=scale, causal=True)
        else:
            total = chunk.start + chunk.length
            padded = -(-total // meta.block_size) * meta.block_size
            keys, values = gather_rows(
                cache_layer, chunk.block_table[None], padded, meta.block_size
            )
            rows = torch.arange(chunk.length, device=q.device)[:, None] + chunk.start
            visible = torch.arange(padded, device=q.device)[None, :] <= rows
            attended = _sdpa(query, keys, values, scale=scale, mask=visible[None, None])
        out[span] = attended[0].transpose(0, 1)
    return out


def decode_attention(
    q: torch.Tensor, cache_layer: torch.Tensor, meta: DecodeMeta, scale: float | None
) -> torch.Tensor:
    """q [rows, heads, d] -> [rows, heads, d], each row over its own positions."""
    if meta.backend == "triton":
        from oai_audio_server.models.kernels.paged_attention import paged_decode_attention

        return paged_decode_attention(
            q, cache_layer, meta.block_tables, meta.positions + 1, meta.block_size,
            scale if scale is not None else q.shape[-1] ** -0.5,
        )
    keys, values = gather_rows(cache_layer, meta.block_tables, meta.kv_len, meta.block_size)
    attended = _sdpa(q[:, :, None], keys, values, scale=scale, mask=meta.mask)
    return attended[:, :, 0]


AttentionMeta = PrefillMeta | DecodeMeta


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_layer: torch.Tensor,
    meta: AttentionMeta, scale: float | None,
) -> torch.Tensor:
    """Store this pass's keys and values, then attend (token-major in and out)."""
    slots = meta.slot_ids if isinstance(meta, DecodeMeta) else meta.slots
    assert slots is not None, "DecodeMeta.prepared() builds the slots"
    store_kv(cache_layer, slots, k, v)
    if isinstance(meta, DecodeMeta):
        return decode_attention(q, cache_layer, meta, scale)
    return prefill_attention(q, k, v, cache_layer, meta, scale)

"""Decode attention over the paged KV cache as one Triton kernel.

One program per (row, key/value head): it walks the row's block table up to the row's own
length, ``TILE`` positions at a time (several blocks gathered per step), with an online
softmax in float32, for all the query heads that share the key/value head (grouped-query
attention). Nothing is read past a row's length and no mask exists, so a captured graph
serves every mix of lengths. models/attention.py's sdpa path is the reference the tests
hold it to (run by Triton's interpreter on a CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr, kv_ptr, tables_ptr, lengths_ptr, out_ptr,
    scale,
    stride_q_row, stride_q_head,
    stride_kv_slot, stride_kv_which, stride_kv_head,
    stride_table_row,
    stride_out_row, stride_out_head,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    length = tl.load(lengths_ptr + row)
    heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)
    head_ok = tl.arange(0, GROUP_PAD) < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + row * stride_q_row + heads[:, None] * stride_q_head + dims[None, :],
        mask=head_ok[:, None], other=0.0,
    ).to(tl.float32) * scale
    best = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    total = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
    for start in range(0, length, TILE):
        positions = start + tl.arange(0, TILE)
        inside = positions < length
        blocks = tl.load(
            tables_ptr + row * stride_table_row + positions // BLOCK_SIZE, mask=inside, other=0
        )
        slots = blocks.to(tl.int64) * BLOCK_SIZE + positions % BLOCK_SIZE
        base = kv_ptr + slots[:, None] * stride_kv_slot + kv_head * stride_kv_head + dims[None, :]
        keys = tl.load(base, mask=inside[:, None], other=0.0).to(tl.float32)
        values = tl.load(base + stride_kv_which, mask=inside[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * keys[None, :, :], axis=2)  # [GROUP_PAD, TILE]
        scores = tl.where(inside[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        correction = tl.exp(best - new_best)
        weights = tl.exp(scores - new_best[:, None])
        total = total * correction + tl.sum(weights, axis=1)
        acc = acc * correction[:, None] + tl.sum(weights[:, :, None] * values[None, :, :], axis=1)
        best = new_best
    out = acc / total[:, None]
    tl.store(
        out_ptr + row * stride_out_row + heads[:, None] * stride_out_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None],
    )


def paged_decode_attention(
    q: torch.Tensor, cache_layer: torch.Tensor, block_tables: torch.Tensor,
    lengths: torch.Tensor, block_size: int, scale: float, tile: int = 64,
) -> torch.Tensor:
    """q [rows, heads, d]; cache_layer [slots, 2, kv_heads, d]; block_tables [rows, n];
    lengths [rows] (positions each row sees) -> [rows, heads, d]."""
    rows, heads, head_dim = q.shape
    kv_heads = cache_layer.shape[2]
    group = heads // kv_heads
    q = q.contiguous()
    out = torch.empty_like(q)
    tile = max(tile, block_size)
    _paged_decode_kernel[(rows, kv_heads)](
        q, cache_layer, block_tables, lengths, out,
        scale,
        q.stride(0), q.stride(1),
        cache_layer.stride(0), cache_layer.stride(1), cache_layer.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, TILE=tile, GROUP=group,
        GROUP_PAD=max(triton.next_power_of_2(group), 1), HEAD_DIM=head_dim,
    )
    return out

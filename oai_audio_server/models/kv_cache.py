"""The paged KV cache: one pool of fixed-size blocks shared by every row.

Keys and values of every layer live in one tensor shaped
[layers, blocks * block_size, 2, kv_heads, head_dim]: a cache *slot* is one position of
one block (``block * block_size + offset``), and a slot's key and value sit side by side,
so writing the new positions of a step is one ``index_copy_`` per layer. A row owns the
blocks its tokens need, listed in its block table; nothing is reserved for tokens it has
not produced yet, so short rows leave room for many more rows than a slot per
``max_model_len`` would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    layers: int
    heads: int  # key/value heads (fewer than query heads under grouped-query attention)
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_position(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.layers * self.heads * self.head_dim * itemsize


DEFAULT_BLOCK_SIZE = 16


def blocks_for_budget(layout: KVLayout, block_size: int, budget_bytes: int) -> int:
    return max(0, budget_bytes // (layout.bytes_per_position * block_size))


def blocks_needed(positions: int, block_size: int) -> int:
    return -(-positions // block_size)


class PagedKVCache:
    def __init__(
        self, layout: KVLayout, num_blocks: int, block_size: int, device: torch.device
    ) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache budget does not hold a single block")
        self.layout = layout
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv = torch.zeros(
            (layout.layers, num_blocks * block_size, 2, layout.heads, layout.head_dim),
            dtype=layout.dtype, device=device,
        )

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def positions(self) -> int:
        return self.num_blocks * self.block_size

    def layer(self, index: int) -> torch.Tensor:
        """[slots, 2, kv_heads, head_dim] of one layer (a view)."""
        return self.kv[index]

    def copy_block(self, source: int, target: int) -> None:
        """Copy one block's keys and values into another (every layer)."""
        size = self.block_size
        self.kv[:, target * size : (target + 1) * size] = self.kv[
            :, source * size : (source + 1) * size
        ]

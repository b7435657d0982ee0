"""Hands out the KV cache's blocks: a free list and a reference count per block.

Only decides; it never touches the cache's memory. A row's block table is the list of
block ids it holds, in position order. Counting references lets several rows hold the same
block (a shared prompt), which is freed when its last holder lets go.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable


class OutOfBlocks(Exception):
    """Fewer free blocks than asked for (the engine waits or preempts; never an error
    a client sees)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, reserved: int = 0) -> None:
        """Blocks ``0..reserved-1`` are never handed out (padding rows write there)."""
        self.num_blocks = num_blocks - reserved
        self.block_size = block_size
        self._free: collections.deque[int] = collections.deque(range(reserved, num_blocks))
        self._refs = [0] * num_blocks

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocks(f"{count} blocks asked for, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        for block in blocks:
            if self._refs[block] <= 0:
                raise ValueError(f"block {block} is not allocated")
            self._refs[block] += 1

    def release(self, blocks: Iterable[int]) -> None:
        for block in blocks:
            if self._refs[block] <= 0:
                raise ValueError(f"block {block} released twice")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)

    def refs(self, block: int) -> int:
        return self._refs[block]

"""Hands out the KV cache's blocks: a free list, a reference count per block, and the
blocks kept for prefix caching.

Only decides; it never touches the cache's memory. A row's block table is the list of
block ids it holds, in position order. Counting references lets several rows hold the same
block (a shared prompt), which is let go when its last holder lets go.

Prefix caching: a full block whose contents are known can be registered under a key (a
hash of everything its keys and values depend on, see ``engine/prefix.py``). A registered
block whose last holder lets go is not freed but kept as *evictable*: a later prompt with
the same key takes it back by reference (``share``). ``allocate`` takes free blocks first,
then evicts the least recently used evictable ones, so ``free_blocks`` (what admission and
preemption see) counts them as free.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence


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
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        # Registered blocks nobody holds, least recently used first.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()

    @property
    def free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        """Registered blocks, held by a row or evictable."""
        return len(self._key_of)

    @property
    def evictable_blocks(self) -> int:
        return len(self._evictable)

    def allocate(self, count: int) -> list[int]:
        if count > self.free_blocks:
            raise OutOfBlocks(f"{count} blocks asked for, {self.free_blocks} free")
        blocks: list[int] = []
        while len(blocks) < count and self._free:
            blocks.append(self._free.popleft())
        while len(blocks) < count:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
            blocks.append(block)
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """One more holder for each block: allocated ones, or evictable ones taken back."""
        for block in blocks:
            if self._refs[block] <= 0:
                if block not in self._evictable:
                    raise ValueError(f"block {block} is not allocated")
                del self._evictable[block]
            self._refs[block] += 1

    def release(self, blocks: Sequence[int], *, forget: bool = False) -> None:
        """One holder fewer for each block. Registered blocks nobody holds stay cached
        (unless ``forget``: their contents are not to be trusted). A row's blocks are
        let go last first, so that its later blocks are evicted before the earlier ones
        that every longer prefix needs."""
        for block in reversed(blocks):
            if self._refs[block] <= 0:
                raise ValueError(f"block {block} released twice")
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._key_of and not forget:
                self._evictable[block] = None
            else:
                self._forget(block)
                self._free.append(block)

    def refs(self, block: int) -> int:
        return self._refs[block]

    # ------------------------------------------------------------ prefix caching

    def register(self, block: int, key: bytes) -> bool:
        """Make a held, full block findable by ``key``. False (nothing changes) when the
        key already has a block (another row computed the same prefix) or the block
        already has a key."""
        if self._refs[block] <= 0:
            raise ValueError(f"block {block} is not allocated")
        if key in self._block_of or block in self._key_of:
            return False
        self._key_of[block] = key
        self._block_of[key] = block
        return True

    def lookup(self, keys: Iterable[bytes]) -> list[int]:
        """The blocks of the longest run of ``keys`` (from the first) that are cached."""
        found: list[int] = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def _forget(self, block: int) -> None:
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._block_of[key]

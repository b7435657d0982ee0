"""The block manager's prefix-cache bookkeeping: registered blocks outlive their rows as
evictable blocks, count as free, are taken back by reference, and are evicted least
recently used first (a row's later blocks before its earlier ones)."""

from __future__ import annotations

import pytest

from oai_audio_server.models.block_manager import BlockManager, OutOfBlocks


def test_a_registered_block_stays_cached_after_release_and_counts_as_free() -> None:
    blocks = BlockManager(5, 16, reserved=1)
    row = blocks.allocate(2)
    assert blocks.register(row[0], b"k0") and blocks.register(row[1], b"k1")
    blocks.release(row)
    assert blocks.free_blocks == 4 and blocks.cached_blocks == 2
    assert blocks.lookup([b"k0", b"k1", b"k2"]) == row
    blocks.share(row)  # taken back by reference
    assert [blocks.refs(b) for b in row] == [1, 1] and blocks.free_blocks == 2


def test_lookup_stops_at_the_first_missing_key() -> None:
    blocks = BlockManager(4, 16)
    row = blocks.allocate(3)
    blocks.register(row[0], b"a")
    blocks.register(row[2], b"c")
    assert blocks.lookup([b"a", b"b", b"c"]) == [row[0]]


def test_allocation_evicts_least_recently_used_and_a_rows_last_block_first() -> None:
    blocks = BlockManager(5, 16, reserved=1)
    first = blocks.allocate(2)
    second = blocks.allocate(2)
    for index, block in enumerate(first + second):
        blocks.register(block, f"k{index}".encode())
    blocks.release(first)
    blocks.release(second)
    (taken,) = blocks.allocate(1)
    assert taken == first[1]  # the older row's later block goes first
    assert blocks.lookup([b"k0"]) == [first[0]] and blocks.lookup([b"k1"]) == []
    assert blocks.cached_blocks == 3
    blocks.allocate(3)
    assert blocks.cached_blocks == 0 and blocks.free_blocks == 0
    with pytest.raises(OutOfBlocks):
        blocks.allocate(1)


def test_one_key_one_block_and_a_failed_rows_blocks_are_forgotten() -> None:
    blocks = BlockManager(4, 16)
    row = blocks.allocate(2)
    assert blocks.register(row[0], b"same")
    assert not blocks.register(row[1], b"same")  # computed twice: the first one stays
    blocks.release(row, forget=True)
    assert blocks.cached_blocks == 0 and blocks.lookup([b"same"]) == []
    assert blocks.free_blocks == 4


def test_sharing_a_free_unregistered_block_is_an_error() -> None:
    blocks = BlockManager(3, 16)
    (block,) = blocks.allocate(1)
    blocks.release([block])
    with pytest.raises(ValueError):
        blocks.share([block])
    with pytest.raises(ValueError):
        blocks.release([block])

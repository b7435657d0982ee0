"""Runs the model on the paged KV cache: packed prefill chunks, decode steps, CUDA graphs.

The runner owns the cache and the device-side row state; the scheduler decides which rows
run and which blocks they hold, the runner only executes. On a GPU, decode steps for a set
of batch sizes are captured as CUDA graphs at start and replayed: a step is one graph
launch instead of hundreds of kernel launches from Python. A batch runs in the smallest
captured size that holds it (the extra rows are padding, see batch.DeviceRows). With the
``triton`` attention backend each row reads only its own blocks, so one graph per batch
size serves every length; the ``sdpa`` backend gathers a power-of-two number of positions
and has a graph per (batch size, length) pair.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from oai_audio_server.engine.batch import DeviceRows
from oai_audio_server.models.attention import AttentionBackend, Chunk, DecodeMeta, PrefillMeta
from oai_audio_server.models.base import EngineModel
from oai_audio_server.models.kv_cache import PagedKVCache, blocks_needed

logger = logging.getLogger(__name__)

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
SMALLEST_KV_BUCKET = 256


def kv_buckets(max_len: int, block_size: int = 1) -> list[int]:
    """Positions an sdpa decode step gathers: powers of two from 256, then the most a row
    can have (rounded up to whole blocks)."""
    largest = blocks_needed(max_len, block_size) * block_size
    buckets = []
    size = SMALLEST_KV_BUCKET
    while size < largest:
        buckets.append(size)
        size *= 2
    buckets.append(largest)
    return buckets


def bucket_for(value: int, buckets: Sequence[int]) -> int:
    for bucket in buckets:
        if bucket >= value:
            return bucket
    raise ValueError(f"{value} is beyond the largest bucket {buckets[-1]}")


@dataclass(frozen=True)
class PrefillWork:
    """One chunk of one row: ``embeds`` [n, hidden] for positions ``start..start+n``,
    and whether the logits of its last token are wanted (the prompt ends here)."""

    embeds: torch.Tensor
    start: int
    variant: int
    blocks: Sequence[int]
    wants_logits: bool


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor


class ModelRunner:
    def __init__(
        self, model: EngineModel, cache: PagedKVCache, device: torch.device, *,
        capacity: int, max_len: int, vocab_limit: int, use_graphs: bool,
        backend: AttentionBackend,
    ) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.capacity = capacity
        self.max_len = max_len
        self.vocab_limit = vocab_limit
        self.backend = backend
        self.block_size = cache.block_size
        self.max_blocks = blocks_needed(max_len, cache.block_size)
        self.rows = DeviceRows(capacity, self.max_blocks, device)
        self.kv_buckets = (
            [self.max_blocks * cache.block_size] if backend == "triton"
            else kv_buckets(max_len, cache.block_size)
        )
        self.batch_buckets = [b for b in GRAPH_BATCH_SIZES if b < capacity] + [capacity]
        self._graphs: dict[tuple[int, int], _Graph] = {}
        if use_graphs and device.type == "cuda":
            self._capture_graphs()

    @property
    def graphs_captured(self) -> int:
        return len(self._graphs)

    def _slots(self, blocks: Sequence[int], start: int, count: int) -> list[int]:
        size = self.block_size
        return [blocks[p // size] * size + p % size for p in range(start, start + count)]

    def prefill(self, work: Sequence[PrefillWork]) -> torch.Tensor:
        """Every chunk in one packed forward pass (no padding); returns the float32
        logits [chunks wanting them, vocab] in order."""
        device = self.device
        chunks: list[Chunk] = []
        slots: list[int] = []
        positions: list[int] = []
        variants: list[int] = []
        last: list[int] = []
        offset = 0
        for item in work:
            count = int(item.embeds.shape[0])
            table = torch.tensor(
                list(item.blocks[: blocks_needed(item.start + count, self.block_size)]),
                dtype=torch.long,
            )
            chunks.append(Chunk(item.start, count, offset, table.to(device)))
            slots.extend(self._slots(item.blocks, item.start, count))
            positions.extend(range(item.start, item.start + count))
            variants.extend([item.variant] * count)
            offset += count
            if item.wants_logits:
                last.append(offset - 1)
        host = torch.tensor([slots, positions, variants], dtype=torch.long).to(device)
        meta = PrefillMeta(
            chunks, host[0], self.block_size, torch.tensor(last, dtype=torch.long).to(device)
        )
        embeds = torch.cat([item.embeds for item in work])
        logits = self.model.prefill(embeds, host[1], host[2], self.cache, meta)
        return logits[:, : self.vocab_limit]

    def _meta(self, count: int, kv_len: int) -> DecodeMeta:
        rows = self.rows
        return DecodeMeta(
            rows.block_tables[:count], rows.positions[:count], self.block_size, kv_len,
            self.backend,
        )

    def decode(self, count: int, longest_position: int) -> torch.Tensor:
        """One step for rows 0..count-1 whose largest position is ``longest_position``."""
        kv_len = bucket_for(longest_position + 1, self.kv_buckets)
        batch = bucket_for(count, self.batch_buckets)
        graph = self._graphs.get((batch, kv_len))
        if graph is not None:
            graph.graph.replay()
            return graph.logits[:count, : self.vocab_limit]
        if self.backend == "sdpa":
            # Eager: gather only the blocks the longest row has (a bucket's fixed shape
            # is for captured graphs).
            kv_len = blocks_needed(longest_position + 1, self.block_size) * self.block_size
        rows = self.rows
        logits = self.model.decode(
            rows.tokens[:count], rows.variants[:count], self.cache, self._meta(count, kv_len)
        )
        return logits[:, : self.vocab_limit]

    def _capture(self, batch: int, kv_len: int, pool: Any) -> _Graph:
        rows = self.rows

        def step() -> torch.Tensor:
            return self.model.decode(
                rows.tokens[:batch], rows.variants[:batch], self.cache,
                self._meta(batch, kv_len),
            )

        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up outside the graph (allocator, kernel choice)
                step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = step()
        return _Graph(graph, logits)

    def _capture_graphs(self) -> None:
        """Capture every (batch size, KV length) pair, largest first so that smaller
        graphs reuse the memory pool. A shape whose capture fails runs eagerly, and the
        log says which."""
        pool = torch.cuda.graph_pool_handle()
        self.rows.clear_from(0)
        failed: list[str] = []
        for batch in sorted(self.batch_buckets, reverse=True):
            for kv_len in sorted(self.kv_buckets, reverse=True):
                try:
                    self._graphs[(batch, kv_len)] = self._capture(batch, kv_len, pool)
                except Exception as exc:  # an optimisation: this shape runs eagerly
                    failed.append(f"{batch}x{kv_len} ({type(exc).__name__}: {exc})")
        if failed:
            logger.warning(
                "CUDA graph capture failed for %d of %d shapes (batch x KV length), which "
                "run eagerly: %s", len(failed), len(failed) + len(self._graphs),
                "; ".join(failed[:3]),
            )
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured %d CUDA graphs (batch sizes %s, KV lengths %s, %s attention)",
            len(self._graphs), self.batch_buckets, self.kv_buckets, self.backend,
        )

"""Runs the model on the engine's cache: prefill, decode steps, CUDA graphs.

The runner owns the KV cache and the device-side row state; the scheduler decides which
rows run, the runner only executes. On a GPU, decode steps for a set of batch sizes and
KV lengths are captured as CUDA graphs at start and replayed: a step is one graph launch
instead of hundreds of kernel launches from Python. A batch runs in the smallest
captured size that holds it (the extra rows are padding in free slots) and attends over
the smallest captured KV length that holds its longest row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from oai_audio_server.audio.types import AudioSegmentFeatures
from oai_audio_server.engine.batch import DeviceRows
from oai_audio_server.engine.kv_cache import SlotKVCache
from oai_audio_server.models.base import EngineModel

logger = logging.getLogger(__name__)

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
SMALLEST_KV_BUCKET = 256


def kv_buckets(slot_len: int) -> list[int]:
    """KV lengths a decode step attends over: powers of two from 256, then the slot."""
    buckets = []
    size = SMALLEST_KV_BUCKET
    while size < slot_len:
        buckets.append(size)
        size *= 2
    buckets.append(slot_len)
    return buckets


def bucket_for(value: int, buckets: Sequence[int]) -> int:
    for bucket in buckets:
        if bucket >= value:
            return bucket
    raise ValueError(f"{value} is beyond the largest bucket {buckets[-1]}")


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor


class ModelRunner:
    def __init__(
        self, model: EngineModel, cache: SlotKVCache, device: torch.device, *,
        capacity: int, vocab_limit: int, use_graphs: bool,
    ) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.capacity = min(capacity, cache.slots)
        self.vocab_limit = vocab_limit
        self.rows = DeviceRows(self.capacity, device)
        self.kv_buckets = kv_buckets(cache.slot_len)
        self.batch_buckets = [b for b in GRAPH_BATCH_SIZES if b < self.capacity] + [self.capacity]
        self._graphs: dict[tuple[int, int], _Graph] = {}
        if use_graphs and device.type == "cuda":
            self._capture_graphs()

    @property
    def graphs_captured(self) -> int:
        return len(self._graphs)

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        audio: Sequence[Sequence[AudioSegmentFeatures]],
        first_slot: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        slots = list(range(first_slot, first_slot + len(prompts)))
        logits, state = self.model.prefill(prompts, audio, slots, self.cache)
        return logits[:, : self.vocab_limit], state

    def decode(self, count: int, longest_position: int) -> torch.Tensor:
        """One step for rows 0..count-1 whose largest position is ``longest_position``."""
        kv_len = bucket_for(longest_position + 1, self.kv_buckets)
        batch = bucket_for(count, self.batch_buckets)
        graph = self._graphs.get((batch, kv_len))
        if graph is not None:
            graph.graph.replay()
            return graph.logits[:count, : self.vocab_limit]
        rows = self.rows
        logits = self.model.decode(
            rows.tokens[:count], rows.positions[:count], rows.row_state[:count],
            self.cache, kv_len,
        )
        return logits[:, : self.vocab_limit]

    def move(self, source: int, target: int, length: int) -> None:
        self.cache.move(source, target, length)
        self.rows.move(source, target)

    def _capture(self, batch: int, kv_len: int, pool: Any) -> _Graph:
        rows = self.rows
        args = (
            rows.tokens[:batch], rows.positions[:batch], rows.row_state[:batch],
            self.cache, kv_len,
        )
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up outside the graph (allocator, kernel choice)
                self.model.decode(*args)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = self.model.decode(*args)
        return _Graph(graph, logits)

    def _capture_graphs(self) -> None:
        """Capture every (batch size, KV length) pair, largest first so that smaller
        graphs reuse the memory pool. A shape whose capture fails runs eagerly, and the
        log says which."""
        pool = torch.cuda.graph_pool_handle()
        rows = self.rows
        rows.clear_from(0)
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
            "captured %d CUDA graphs (batch sizes %s, KV lengths %s)",
            len(self._graphs), self.batch_buckets, self.kv_buckets,
        )

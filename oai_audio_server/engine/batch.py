"""Rows decoding together, and the KV-cache surgery that lets rows join and leave.

The Qwen remote code keeps its cache as a tuple per layer of (key, value) shaped
[batch, seq, heads, dim] and derives rotary positions from the cache length, ignoring
``position_ids``. So every row in a batch must share one cache length: a row joining a
running batch is prefilled left-padded to exactly that length, which keeps each row's
relative positions (all rotary attention depends on) the same as if it ran alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from oai_audio_server.engine.detokenizer import IncrementalText
from oai_audio_server.engine.pacing import TextPacer

KVCache = tuple[tuple[torch.Tensor, ...], ...]


@dataclass(eq=False)
class Row:
    """One request being decoded."""

    handle: Any  # engine.scheduler.RequestHandle
    text: IncrementalText
    generator: torch.Generator | None
    pacer: TextPacer
    generated: list[int] = field(default_factory=list)
    pending_token: int | None = None  # sampled, not yet fed through the model
    finished: bool = False


@dataclass
class Batch:
    rows: list[Row]
    past: KVCache
    attention_mask: torch.Tensor  # [rows, cache length], 1 for real tokens

    @property
    def length(self) -> int:
        return int(self.attention_mask.shape[1])

    def keep(self, indices: list[int]) -> Batch:
        if len(indices) == len(self.rows):
            return self
        index = torch.tensor(indices, dtype=torch.long, device=self.attention_mask.device)
        past = tuple(
            tuple(t.index_select(0, index.to(t.device)) for t in layer) for layer in self.past
        )
        return Batch(
            rows=[self.rows[i] for i in indices],
            past=past,
            attention_mask=self.attention_mask.index_select(0, index),
        )

    def extend(self, other: Batch) -> Batch:
        if other.length != self.length:
            raise ValueError("rows can only join a batch at the same cache length")
        past = tuple(
            tuple(torch.cat([a, b], dim=0) for a, b in zip(mine, theirs, strict=True))
            for mine, theirs in zip(self.past, other.past, strict=True)
        )
        return Batch(
            rows=self.rows + other.rows,
            past=past,
            attention_mask=torch.cat([self.attention_mask, other.attention_mask], dim=0),
        )

"""Rows of the running batch and the device state of their next decode step.

A row holds the KV-cache blocks its tokens need (its block table, in position order). The
decoding rows are rows 0..n-1 of the device tensors a decode step reads (next input token,
position, rotary variant, block table); they stay on the device and are updated there: the
sampled ids are copied in, the positions advance by one. When a row leaves, the last row's
entries move into its place (a few numbers, never its keys and values: those stay in their
blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from oai_audio_server.engine.detokenizer import IncrementalText
from oai_audio_server.engine.pacing import TextPacer
from oai_audio_server.engine.prefix import PrefixState
from oai_audio_server.engine.sampling import RowSampling


@dataclass(eq=False)
class Row:
    """One request being prefilled or decoded."""

    handle: Any  # engine.handles.RequestHandle
    text: IncrementalText
    pacer: TextPacer
    variant: int  # the rotary table of every position (chosen by the prompt's length)
    # Position the row's next input token is written to (its length in the cache so far).
    position: int = 0
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    blocks: list[int] = field(default_factory=list)
    # While prefilling: the embeddings still to run (from position ``cached`` on: the
    # positions before it were in the cache) and how many of them ran.
    pending: torch.Tensor | None = None
    prefilled: int = 0
    cached: int = 0
    prefix: PrefixState | None = None  # its block keys (engine/prefix.py)
    # A row preempted and resumed has its next input token already (no sampling after
    # its prefill).
    resumed: bool = False
    # Its sampler state, from when it first joins the decoding rows (kept across a
    # preemption).
    sampling: RowSampling | None = None
    # The other choices (``n`` > 1) of the same prompt: they hold a row's place and one
    # block each until this row's prefill ends, then take its prompt blocks by reference.
    followers: list[Row] = field(default_factory=list)

    @property
    def prefill_total(self) -> int:
        return 0 if self.pending is None else int(self.pending.shape[0])

    @property
    def prefill_positions(self) -> int:
        """Positions its prefill writes: the prompt, or for a preempted row the prompt
        and its answer but the last token (which is its next input)."""
        return self.position if self.resumed else len(self.handle.request.prompt_ids)


def with_followers(rows: Sequence[Row]) -> list[Row]:
    return [each for row in rows for each in (row, *row.followers)]


class DeviceRows:
    """Per-row decode inputs for up to ``capacity`` rows, kept on the device. Rows past
    the batch are padding for a captured graph: their block tables point at block 0,
    which the engine never hands out, so their writes land nowhere that is read."""

    def __init__(self, capacity: int, max_blocks: int, device: torch.device) -> None:
        self.tokens = torch.zeros(capacity, dtype=torch.long, device=device)
        self.positions = torch.zeros(capacity, dtype=torch.long, device=device)
        self.variants = torch.zeros(capacity, dtype=torch.long, device=device)
        self.block_tables = torch.zeros((capacity, max_blocks), dtype=torch.long, device=device)
        self._device = device

    def load(
        self, index: int, token: torch.Tensor, position: int, variant: int,
        blocks: Sequence[int],
    ) -> None:
        """Row ``index`` after its prefill: its next input token [1] (on the device), the
        position that token is written to, its rotary variant and its blocks."""
        self.tokens[index : index + 1] = token
        values = torch.tensor([position, variant], dtype=torch.long)
        self.positions[index], self.variants[index] = values.to(self._device)
        table = torch.zeros(self.block_tables.shape[1], dtype=torch.long)
        table[: len(blocks)] = torch.tensor(list(blocks), dtype=torch.long)
        self.block_tables[index] = table.to(self._device)

    def set_block(self, index: int, slot: int, block: int) -> None:
        self.block_tables[index, slot] = block

    def move(self, source: int, target: int) -> None:
        for tensor in (self.tokens, self.positions, self.variants, self.block_tables):
            tensor[target] = tensor[source]

    def clear_from(self, start: int) -> None:
        for tensor in (self.tokens, self.positions, self.variants, self.block_tables):
            tensor[start:] = 0

    def advance(self, count: int, chosen: torch.Tensor) -> None:
        self.tokens[:count] = chosen
        self.positions[:count] += 1

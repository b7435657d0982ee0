"""The KV cache: allocated once, one slot of ``slot_len`` positions per batch row.

Keys and values of every layer live in two tensors shaped
[layers, slots, heads, slot_len, head_dim]. Row i of the running batch always uses slot
i: prefill writes a newcomer's whole prompt into the first free slot, each decode step
writes one position per row in place, and when a row leaves, the last row's positions
are copied into its slot (one row's keys and values, not the batch's), so the running
rows always fill slots 0..n-1. A decode step can therefore attend over a plain view
``keys[layer, :n, :, :kv_len]``, which CUDA graphs can capture, with no gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    layers: int
    heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_position(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.layers * self.heads * self.head_dim * itemsize


def slots_for_budget(layout: KVLayout, slot_len: int, budget_bytes: int) -> int:
    return max(0, budget_bytes // (layout.bytes_per_position * slot_len))


class SlotKVCache:
    def __init__(self, layout: KVLayout, slots: int, slot_len: int, device: torch.device) -> None:
        if slots < 1:
            raise ValueError("the KV cache budget does not hold a single sequence")
        shape = (layout.layers, slots, layout.heads, slot_len, layout.head_dim)
        self.layout = layout
        self.slots = slots
        self.slot_len = slot_len
        self.keys = torch.zeros(shape, dtype=layout.dtype, device=device)
        self.values = torch.zeros(shape, dtype=layout.dtype, device=device)

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first ``length`` positions of one slot into another."""
        if source != target and length > 0:
            self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
            self.values[:, target, :, :length] = self.values[:, source, :, :length]

"""Rows decoding together and the device state of their next step.

Row i of the batch lives in KV-cache slot i (see kv_cache.py). The tensors a decode step
reads (each row's next input token, its position and its rotary variant) stay on the
device and are updated there: the sampled ids are copied in, the positions advance by
one. Only when rows join or leave are they rebuilt from the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from oai_audio_server.engine.detokenizer import IncrementalText
from oai_audio_server.engine.pacing import TextPacer
from oai_audio_server.engine.sampling import RowSampling


@dataclass(eq=False)
class Row:
    """One request being decoded."""

    handle: Any  # engine.scheduler.RequestHandle
    text: IncrementalText
    sampling: RowSampling
    pacer: TextPacer
    # Position the row's next input token is written to (its length so far).
    position: int = 0
    generated: list[int] = field(default_factory=list)
    finished: bool = False


class DeviceRows:
    """Per-row decode inputs for up to ``capacity`` rows, kept on the device."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.tokens = torch.zeros(capacity, dtype=torch.long, device=device)
        self.positions = torch.zeros(capacity, dtype=torch.long, device=device)
        self.row_state = torch.zeros(capacity, dtype=torch.long, device=device)
        self._device = device

    def load(
        self, start: int, tokens: torch.Tensor, positions: list[int], state: torch.Tensor
    ) -> None:
        """Rows ``start..`` from a prefill: first sampled ids, positions, variants."""
        end = start + len(positions)
        self.tokens[start:end] = tokens
        self.positions[start:end] = torch.tensor(positions, dtype=torch.long).to(self._device)
        self.row_state[start:end] = state

    def move(self, source: int, target: int) -> None:
        for tensor in (self.tokens, self.positions, self.row_state):
            tensor[target] = tensor[source]

    def clear_from(self, start: int) -> None:
        """Rows past the batch are padding for a captured graph: keep their positions
        in range (they write to free slots only)."""
        self.positions[start:] = 0
        self.tokens[start:] = 0
        self.row_state[start:] = 0

    def advance(self, count: int, chosen: torch.Tensor) -> None:
        self.tokens[:count] = chosen
        self.positions[:count] += 1

"""What the engine needs of a model family: one interface, so every family runs on the
same cache, batching, sampling and CUDA graphs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from oai_audio_server.audio.types import AudioSegmentFeatures
from oai_audio_server.engine.kv_cache import KVLayout, SlotKVCache


class EngineModel(Protocol):
    max_len: int  # longest sequence (prompt + answer) a row may reach

    @property
    def kv_layout(self) -> KVLayout: ...

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        audio: Sequence[Sequence[AudioSegmentFeatures]],
        slots: Sequence[int],
        cache: SlotKVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run whole prompts (with their audio) and write their keys and values into
        ``slots``. Returns the float32 logits of each prompt's last position [rows, vocab]
        and a per-row state for decode [rows] (the row's rotary variant)."""
        ...

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        row_state: torch.Tensor,
        cache: SlotKVCache,
        kv_len: int,
    ) -> torch.Tensor:
        """One token per running row (row i in slot i) at ``positions``; attends over the
        first ``kv_len`` cache positions. Returns float32 logits [rows, vocab]. Tensor
        shapes depend only on the row count and ``kv_len``, so it can be graph-captured."""
        ...

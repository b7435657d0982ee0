"""Drives an engine model directly on a paged KV cache, the way the engine does (blocks
from a BlockManager, packed prefill chunks through the ModelRunner), for tests that
compare logits with a reference."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from oai_audio_server.audio.types import AudioSegmentFeatures
from oai_audio_server.engine.runner import ModelRunner, PrefillWork
from oai_audio_server.models.base import EngineModel
from oai_audio_server.models.block_manager import BlockManager
from oai_audio_server.models.kv_cache import PagedKVCache, blocks_needed


class PagedDriver:
    def __init__(
        self, model: EngineModel, *, max_len: int, rows: int = 4, block_size: int = 16,
        num_blocks: int | None = None, vocab_limit: int | None = None,
        backend: str = "sdpa", device: torch.device | None = None,
    ) -> None:
        device = device or torch.device("cpu")
        blocks = num_blocks or rows * blocks_needed(max_len, block_size)
        cache = PagedKVCache(model.kv_layout, blocks + 1, block_size, device)
        self.model = model
        self.device = device
        self.blocks = BlockManager(blocks + 1, block_size, reserved=1)
        self.runner = ModelRunner(
            model, cache, device, capacity=rows, max_len=max_len,
            vocab_limit=vocab_limit or 10**9, use_graphs=False,
            backend=backend,  # type: ignore[arg-type]
        )
        self.tables: list[list[int]] = []
        self.lengths: list[int] = []
        self.variants: list[int] = []

    def prefill(
        self, prompts: Sequence[Sequence[int]],
        audio: Sequence[Sequence[AudioSegmentFeatures]] | None = None,
        chunk: int | None = None,
    ) -> torch.Tensor:
        """Prefill new rows (appended after the existing ones), ``chunk`` tokens of each
        per pass when given; returns the last-position logits [len(prompts), vocab]."""
        audio = audio if audio is not None else [[] for _ in prompts]
        embeds = self.model.embed_prompts(prompts, audio)
        first = len(self.tables)
        for prompt in prompts:
            needed = blocks_needed(len(prompt), self.blocks.block_size)
            self.tables.append(self.blocks.allocate(needed))
            self.lengths.append(len(prompt))
            self.variants.append(self.model.rotary_variant(len(prompt)))
        done = [0] * len(prompts)
        logits: dict[int, torch.Tensor] = {}
        while any(d < len(p) for d, p in zip(done, prompts, strict=True)):
            work, which = [], []
            for i, prompt in enumerate(prompts):
                if done[i] >= len(prompt):
                    continue
                take = min(len(prompt) - done[i], chunk or len(prompt))
                row = first + i
                work.append(PrefillWork(
                    embeds[i][done[i] : done[i] + take], done[i], self.variants[row],
                    self.tables[row], wants_logits=done[i] + take == len(prompt),
                ))
                done[i] += take
                if done[i] == len(prompt):
                    which.append(i)
            out = self.runner.prefill(work)
            for index, i in enumerate(which):
                logits[i] = out[index]
        return torch.stack([logits[i] for i in range(len(prompts))])

    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        """One step for every row (row i gets ``tokens[i]`` at its current length)."""
        rows = self.runner.rows
        size = self.blocks.block_size
        for index, token in enumerate(tokens):
            if self.lengths[index] // size >= len(self.tables[index]):
                self.tables[index] += self.blocks.allocate(1)
            rows.load(index, torch.tensor([token]), self.lengths[index], self.variants[index],
                      self.tables[index])
        logits = self.runner.decode(len(tokens), max(self.lengths[: len(tokens)]))
        for index in range(len(tokens)):
            self.lengths[index] += 1
        return logits

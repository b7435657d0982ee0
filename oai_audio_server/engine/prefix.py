"""Prefix caching: a request starts from the longest prefix of its prompt whose keys and
values are already in the paged cache (an earlier turn of the same conversation, the same
system prompt), taken by reference, with no prefill and no audio encoding for it.

Every full block of a sequence gets a key: a hash chained over the key of the block
before it (so a key stands for the whole prefix up to the block's end) and everything the
block's keys and values depend on:

- the token ids of its positions;
- for positions inside an audio span, that audio's content (a hash of its mel features)
  and the span's context (Qwen-Audio cuts every audio of a prompt at the prompt's longest
  one, so the same audio beside a longer one encodes differently), and where the block
  falls in the span. Audio placeholders carry the same token ids whatever the audio, so
  ids alone would let another audio's keys and values through;
- the row's rotary variant: Qwen-Audio chooses its dynamic-NTK base from the whole
  prompt's length, so a prompt past 2048 tokens rotates even its first positions
  differently;
- the model: family, checkpoint, dtype and block size (the chain's root).

The blocks themselves, with the key -> block table and the eviction order, are kept by
``models/block_manager.py``; this module computes keys, decides what a request takes from
the cache and registers blocks as their contents become known: prompt blocks as prefill
chunks fill them, and when a row leaves (finished or preempted) the blocks of its answer
too, so the next turn, whose prompt holds this turn's answer, finds them, and a preempted
row finds its own blocks when it comes back.

A row never writes into a block it shares: it takes at most the full blocks before the
last token it must compute (the last prompt token's logits are needed), and its own
positions start in a block of its own.
"""

from __future__ import annotations

import hashlib
import struct
import weakref
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from oai_audio_server.audio.types import AudioSegmentFeatures
from oai_audio_server.models.base import AudioSpan, EngineModel
from oai_audio_server.models.block_manager import BlockManager
from oai_audio_server.models.kv_cache import blocks_needed

KEY_BYTES = 16


def _digest(*parts: bytes) -> bytes:
    hasher = hashlib.blake2b(digest_size=KEY_BYTES)
    for part in parts:
        hasher.update(part)
    return hasher.digest()


def model_fingerprint(family: str, checkpoint: str, dtype: torch.dtype, block_size: int) -> bytes:
    """The root of every chain: keys from another model or dtype never match."""
    return _digest(f"{family}\0{checkpoint}\0{dtype}\0{block_size}".encode())


def audio_key(segment: AudioSegmentFeatures, span: AudioSpan) -> bytes:
    """What an audio span's embeddings are made of: the segment's features and the
    span's context."""
    mel = segment.mel.detach().to("cpu").contiguous()
    return _digest(mel.numpy().tobytes(), struct.pack("<qq", segment.length_after_cnn,
                                                      span.context))


@dataclass
class PrefixState:
    """One request's block keys, computed as far as needed (its audio hashed once)."""

    variant: int
    audio: list[tuple[AudioSpan, bytes]]
    keys: list[bytes] = field(default_factory=list)
    registered: int = 0  # leading blocks of the row that are in the cache
    cached_tokens: int = -1  # positions taken from the cache at its first start


class PrefixCache:
    """What a row takes from the cache when it starts, and what it leaves there."""

    def __init__(
        self, blocks: BlockManager, model: EngineModel, fingerprint: bytes, *, enabled: bool
    ) -> None:
        self.blocks = blocks
        self.enabled = enabled
        self._model = model
        self._root = fingerprint
        # Keyed by request handle: a request waiting for blocks is planned again every
        # step, its audio hashed once; the entry goes with the handle.
        self._states: weakref.WeakKeyDictionary[Any, PrefixState] = (
            weakref.WeakKeyDictionary()
        )
        self.hit_tokens = 0  # prompt positions taken from the cache by new requests
        self.miss_tokens = 0  # prompt positions they had to compute

    def state(self, handle: Any, variant: int) -> PrefixState:
        state = self._states.get(handle)
        if state is None:
            request = handle.request
            audio: list[tuple[AudioSpan, bytes]] = []
            if self.enabled and request.audio:
                spans = self._model.audio_spans(request.prompt_ids, request.audio)
                audio = [(span, audio_key(segment, span))
                         for segment, span in zip(request.audio, spans, strict=True)]
            state = PrefixState(variant, audio)
            self._states[handle] = state
        return state

    def choice_state(self, leader: PrefixState) -> PrefixState:
        """The state of another choice of ``leader``'s prompt (n > 1), once the leader
        has its blocks: the same audio, prompt keys (computed before any answer) and
        cached tokens; its own chain from its answer on."""
        return PrefixState(leader.variant, leader.audio, keys=list(leader.keys),
                           cached_tokens=leader.cached_tokens)

    # ------------------------------------------------------------------ keys

    def _keys(self, state: PrefixState, ids: Sequence[int], count: int) -> list[bytes]:
        """Keys of the first ``count`` full blocks of ``ids`` (a chain, extended as
        needed; ``ids`` only ever grows at its end)."""
        size = self.blocks.block_size
        keys = state.keys
        variant = struct.pack("<q", state.variant)
        while len(keys) < count:
            index = len(keys)
            first, end = index * size, (index + 1) * size
            parts = [keys[-1] if keys else self._root, variant,
                     array("q", ids[first:end]).tobytes()]
            for span, key in state.audio:
                if span.start < end and span.end > first:
                    parts += [key, struct.pack("<qq", span.start - first,
                                               max(first, span.start) - span.start)]
            keys.append(_digest(*parts))
        return keys[:count]

    def _matchable(self, length: int) -> int:
        """Blocks a sequence of ``length`` positions may take from the cache: the full
        ones before its last position (which is computed, for its logits)."""
        return max(0, length - 1) // self.blocks.block_size

    def _match(self, state: PrefixState, ids: Sequence[int], length: int) -> list[int]:
        if not self.enabled:
            return []
        return self.blocks.lookup(self._keys(state, ids, self._matchable(length)))

    # ------------------------------------------------------------------ admission

    def cost(self, state: PrefixState, ids: Sequence[int], length: int) -> int:
        """Free blocks a sequence of ``length`` positions takes to start: every block but
        the cached ones other rows hold (an evictable cached block counts as free)."""
        needed = blocks_needed(length, self.blocks.block_size)
        held = [b for b in self._match(state, ids, length) if self.blocks.refs(b) > 0]
        return needed - len(held)

    def start(self, state: PrefixState, ids: Sequence[int], length: int) -> tuple[list[int], int]:
        """The blocks of a row starting a sequence of ``length`` positions (``ids``
        from 0) and how many positions are already in them."""
        shared = self._match(state, ids, length)
        self.blocks.share(shared)
        fresh = self.blocks.allocate(blocks_needed(length, self.blocks.block_size)
                                     - len(shared))
        state.registered = len(shared)
        cached = len(shared) * self.blocks.block_size
        if state.cached_tokens < 0:  # a new request, not a preempted one coming back
            state.cached_tokens = cached
            self.hit_tokens += cached
            self.miss_tokens += length - cached
        return shared + fresh, cached

    # ------------------------------------------------------------------ filling

    def filled(
        self, state: PrefixState, blocks: Sequence[int], ids: Sequence[int], valid: int
    ) -> None:
        """Register the row's full blocks among its first ``valid`` positions."""
        if not self.enabled:
            return
        full = min(valid // self.blocks.block_size, len(blocks))
        if full <= state.registered:
            return
        keys = self._keys(state, ids, full)
        for index in range(state.registered, full):
            self.blocks.register(blocks[index], keys[index])
        state.registered = full

    def release(
        self, state: PrefixState | None, blocks: Sequence[int], ids: Sequence[int],
        valid: int, *, failed: bool = False,
    ) -> None:
        """A row lets go of its blocks; those of its first ``valid`` positions are kept
        for later requests (none after a failure: their contents are unknown)."""
        if state is not None and not failed:
            self.filled(state, blocks, ids, valid)
        self.blocks.release(blocks, forget=failed)
        if state is not None:
            state.registered = 0

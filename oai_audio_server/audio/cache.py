"""A thread-safe LRU of prepared audio keyed by the sha256 of the source bytes.

Bounded by the total bytes of the features it holds, so a repeated audio (a history
audio on the next turn, the same clip in many requests) is decoded and featurised once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from oai_audio_server.audio.types import PreparedAudio

MIB = 1024 * 1024


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    max_bytes: int


class FeatureCache:
    """LRU of :class:`PreparedAudio` by digest; ``max_bytes`` 0 disables it."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[str, PreparedAudio] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._lock = threading.Lock()

    @classmethod
    def from_megabytes(cls, megabytes: int) -> FeatureCache:
        return cls(megabytes * MIB)

    @property
    def enabled(self) -> bool:
        return self._max_bytes > 0

    def get(self, digest: str) -> PreparedAudio | None:
        with self._lock:
            prepared = self._entries.get(digest)
            if prepared is None:
                self._misses += 1
                return None
            self._entries.move_to_end(digest)
            self._hits += 1
            return prepared

    def put(self, prepared: PreparedAudio) -> None:
        size = prepared.nbytes
        if size > self._max_bytes:
            return  # also covers a disabled cache
        with self._lock:
            previous = self._entries.pop(prepared.digest, None)
            if previous is not None:
                self._bytes -= previous.nbytes
            self._entries[prepared.digest] = prepared
            self._bytes += size
            while self._bytes > self._max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self._evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=len(self._entries),
                bytes=self._bytes,
                max_bytes=self._max_bytes,
            )

from __future__ import annotations

import threading

import torch

from oai_audio_server.audio import AudioSegmentFeatures, FeatureCache, PreparedAudio


def _prepared(digest: str, segments: int = 1) -> PreparedAudio:
    mel = torch.zeros(80, 3000)
    return PreparedAudio(
        digest=digest,
        duration_seconds=30.0 * segments,
        segments=tuple(
            AudioSegmentFeatures(mel, 1500, 750, 30.0 * i, 30.0 * (i + 1)) for i in range(segments)
        ),
    )


ONE = 80 * 3000 * 4


def test_hit_and_miss_counters() -> None:
    cache = FeatureCache(10 * ONE)
    assert cache.get("a") is None
    cache.put(_prepared("a"))
    assert cache.get("a") is not None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes) == (1, 1, 1, ONE)


def test_evicts_least_recently_used_by_bytes() -> None:
    cache = FeatureCache(3 * ONE)
    cache.put(_prepared("a"))
    cache.put(_prepared("b"))
    cache.put(_prepared("c"))
    cache.get("a")  # a is now the most recent
    cache.put(_prepared("d", segments=2))
    assert cache.get("a") is not None
    assert cache.get("b") is None
    assert cache.get("c") is None
    assert cache.get("d") is not None
    assert cache.stats().bytes == 3 * ONE
    assert cache.stats().evictions == 2


def test_entry_larger_than_the_cache_is_not_stored() -> None:
    cache = FeatureCache(ONE)
    cache.put(_prepared("big", segments=2))
    assert len(cache) == 0


def test_zero_disables() -> None:
    cache = FeatureCache.from_megabytes(0)
    assert not cache.enabled
    cache.put(_prepared("a"))
    assert cache.get("a") is None


def test_replacing_an_entry_keeps_the_byte_count_right() -> None:
    cache = FeatureCache(10 * ONE)
    cache.put(_prepared("a"))
    cache.put(_prepared("a", segments=2))
    assert cache.stats().bytes == 2 * ONE
    assert len(cache) == 1


def test_concurrent_use_is_consistent() -> None:
    cache = FeatureCache(8 * ONE)
    entries = [_prepared(str(i)) for i in range(32)]

    def work(offset: int) -> None:
        for round_ in range(200):
            entry = entries[(offset + round_) % len(entries)]
            if cache.get(entry.digest) is None:
                cache.put(entry)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = cache.stats()
    assert stats.hits + stats.misses == 8 * 200
    assert stats.bytes == stats.entries * ONE <= 8 * ONE

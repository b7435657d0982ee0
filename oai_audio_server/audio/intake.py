"""The one entry point the service layer calls to turn request audio into features.

Bytes (from base64, a URL or a multipart upload) are hashed; a cached result is
returned without decoding. Otherwise decoding, segmenting and featurising run in a
worker thread, never on the event loop; so do base64 and data: URI decoding and the
hashing, whose cost grows with the request. Concurrent requests for the same bytes share
one decode. Nothing is written to disk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from oai_audio_server.audio.cache import FeatureCache
from oai_audio_server.audio.decode import SAMPLE_RATE, decode_audio
from oai_audio_server.audio.features import MelFeatureExtractor, min_samples_for_one_token
from oai_audio_server.audio.fetch import NOT_ALLOWED, fetch_audio_url
from oai_audio_server.audio.payload import (
    AudioBytes,
    Payload,
    decode_base64_audio,
    decode_data_uri,
    head,
    strip_payload,
    too_large,
)
from oai_audio_server.audio.segment import split_audio
from oai_audio_server.audio.types import PreparedAudio
from oai_audio_server.errors import APIError, InvalidAudioError, InvalidRequestError
from oai_audio_server.settings import Settings

_MIN_SAMPLES = min_samples_for_one_token()
T = TypeVar("T")


@dataclass(frozen=True)
class IntakeStats:
    decodes: int  # audios actually decoded and featurised
    cache_hits: int
    cache_misses: int
    shared_decodes: int  # requests that waited on another request's decode of the same bytes
    cache_entries: int
    cache_bytes: int


class AudioIntake:
    def __init__(
        self,
        settings: Settings,
        extractor: MelFeatureExtractor,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self._settings = settings
        self._extractor = extractor
        self._executor = executor
        self._cache = FeatureCache.from_megabytes(settings.audio_cache_mb)
        self._lock = threading.Lock()
        self._decodes = 0
        self._shared = 0
        self._in_flight: dict[str, asyncio.Future[PreparedAudio]] = {}

    @property
    def cache(self) -> FeatureCache:
        return self._cache

    @property
    def stats(self) -> IntakeStats:
        cache = self._cache.stats()
        with self._lock:
            return IntakeStats(
                decodes=self._decodes,
                cache_hits=cache.hits,
                cache_misses=cache.misses,
                shared_decodes=self._shared,
                cache_entries=cache.entries,
                cache_bytes=cache.bytes,
            )

    async def _in_worker(self, work: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)

    async def from_base64(self, data: Payload, format_hint: str | None) -> PreparedAudio:
        """``data`` is a str, or the bytes of a long string cut out of the request JSON."""
        stripped = strip_payload(data)
        if _is_data_uri(stripped):
            return await self.from_url(stripped)
        raw = await self._in_worker(decode_base64_audio, data, self._settings.max_audio_bytes)
        return await self.from_bytes(raw, format_hint)

    async def from_url(self, url: Payload) -> PreparedAudio:
        url = strip_payload(url)
        if _is_data_uri(url):
            raw = await self._in_worker(decode_data_uri, url, self._settings.max_audio_bytes)
        elif isinstance(url, str):
            raw = await fetch_audio_url(url, self._settings)
        else:
            raise InvalidRequestError(
                f"The audio URL is {len(url)} characters long; only data: URIs may be that "
                "long. Send the audio as a data: URI or input_audio, or a shorter URL.",
                code=NOT_ALLOWED,
            )
        return await self.from_bytes(raw, _extension_hint(head(url, 256)))

    async def from_bytes(self, data: AudioBytes, format_hint: str | None) -> PreparedAudio:
        max_bytes = self._settings.max_audio_bytes
        if len(data) > max_bytes:
            raise too_large(len(data), max_bytes)
        digest = await self._in_worker(_sha256, data)
        cached = self._cache.get(digest)
        if cached is not None:
            return cached
        loop = asyncio.get_running_loop()
        running = self._in_flight.get(digest)
        if running is not None and running.get_loop() is loop:
            with self._lock:
                self._shared += 1
            return await _shared_result(running)
        future = loop.run_in_executor(self._executor, self._prepare, data, format_hint, digest)
        self._in_flight[digest] = future
        future.add_done_callback(lambda done: self._forget(digest, done))
        return await _shared_result(future)

    def _forget(self, digest: str, done: asyncio.Future[PreparedAudio]) -> None:
        if self._in_flight.get(digest) is done:
            del self._in_flight[digest]
        if not done.cancelled() and done.exception() is None:
            self._cache.put(done.result())

    def _prepare(self, data: AudioBytes, format_hint: str | None, digest: str) -> PreparedAudio:
        """Decode, segment and featurise; runs in a worker thread."""
        with self._lock:
            self._decodes += 1
        samples = decode_audio(
            data, format_hint=format_hint, max_seconds=self._settings.max_audio_seconds
        )
        if samples.shape[0] < _MIN_SAMPLES:
            raise InvalidAudioError(
                f"The audio is too short ({1000 * samples.shape[0] / SAMPLE_RATE:.1f} ms); "
                f"at least {1000 * _MIN_SAMPLES / SAMPLE_RATE:.0f} ms are needed."
            )
        segments = tuple(
            self._extractor.extract(segment.samples, start_seconds=segment.start_seconds)
            for segment in split_audio(samples)
        )
        return PreparedAudio(
            digest=digest,
            duration_seconds=samples.shape[0] / SAMPLE_RATE,
            segments=segments,
        )


def _is_data_uri(stripped: Payload) -> bool:
    return head(stripped, 5).lower() == "data:"


def _sha256(data: AudioBytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _shared_result(future: asyncio.Future[PreparedAudio]) -> PreparedAudio:
    """Await a decode that other requests may share, without letting them share errors.

    A cancelled waiter must not cancel the decode the others wait for, and each caller
    gets its own copy of an error because callers set ``param`` on it.
    """
    try:
        return await asyncio.shield(future)
    except APIError as error:
        raise copy.copy(error) from error


def _extension_hint(url: str) -> str | None:
    if url[:5].lower() == "data:":
        media_type = url[5:].split(",", 1)[0].split(";", 1)[0]
        return media_type.rpartition("/")[2] or None
    path = url.split("?", 1)[0].split("#", 1)[0]
    name = path.rsplit("/", 1)[-1]
    if "." not in name:
        return None
    return name.rsplit(".", 1)[-1].lower() or None

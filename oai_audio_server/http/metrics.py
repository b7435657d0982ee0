"""Prometheus metrics on ``/metrics``, from a registry owned by one app (never the
process-wide default registry, so several apps can live in one process).

Request counts, latencies, time to first token, tokens and audio seconds are recorded
when a request ends (from its :class:`RequestRecord`). Engine queue and batch figures
and audio intake counters are read from the runtime at scrape time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from litestar import Response, get
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from oai_audio_server.http.loop_watch import LoopWatch
from oai_audio_server.http.request_log import RequestRecord
from oai_audio_server.runtime import Runtime

PREFIX = "oas"
# Litestar adds "; charset=utf-8" to text types itself: without this, it came twice.
EXPOSITION_MEDIA_TYPE = "; ".join(
    p for p in (part.strip() for part in CONTENT_TYPE_LATEST.split(";"))
    if not p.startswith("charset=")
)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)
# Engine figures that are levels, not running totals.
_ENGINE_GAUGES = {
    "queue_depth": "Requests waiting for the model.",
    "batch_size": "Sequences in the running batch.",
    "kv_blocks_cached": "KV-cache blocks holding a cached prefix (in use or evictable).",
}
# Engine figures that are highs since start: gauges too (they are no running totals).
_ENGINE_PEAKS = {"peak_batch_size": "Most sequences in one batch since start."}


class ServerMetrics:
    def __init__(self, runtime: Runtime) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests by method, route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Time from request arrival to the end of the response (whole stream).",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from request arrival to the first answer text, for streamed and JSON replies.",
            ["stream"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self._prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens",
            "Prompt tokens of finished answers (audio included).",
            registry=self.registry,
        )
        self._completion_tokens = Counter(
            f"{PREFIX}_completion_tokens",
            "Generated tokens of finished answers.",
            registry=self.registry,
        )
        self._audio_seconds = Counter(
            f"{PREFIX}_audio_seconds",
            "Seconds of audio in the prompts of finished answers.",
            registry=self.registry,
        )
        self.registry.register(RuntimeCollector(runtime))
        self.loop_watch = LoopWatch(self.registry, PREFIX)

    def observe(self, record: RequestRecord) -> None:
        self._requests.labels(record.method, record.route, record.outcome).inc()
        self._latency.labels(record.method, record.route).observe(record.latency_seconds)
        if record.first_token_seconds is not None:
            stream = "true" if record.stream else "false"
            self._first_token.labels(stream).observe(record.first_token_seconds)
        if record.prompt_tokens is not None:
            self._prompt_tokens.inc(record.prompt_tokens)
        if record.completion_tokens is not None:
            self._completion_tokens.inc(record.completion_tokens)
        if record.audio_seconds is not None:
            self._audio_seconds.inc(record.audio_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _metric_name(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


class RuntimeCollector(Collector):
    """Engine and audio intake figures, read when Prometheus scrapes."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def describe(self) -> list[Metric]:
        return []  # names depend on the engine's counters; nothing to check up front

    def collect(self) -> Iterator[Metric]:
        engine = self._runtime.engine
        yield GaugeMetricFamily(
            f"{PREFIX}_model_ready",
            "1 once the model is loaded, 0 before.",
            value=1.0 if engine.ready else 0.0,
        )
        stats = engine.stats()
        for name, help_text in _ENGINE_GAUGES.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", help_text, value=stats.get(name, 0.0))
        for name, help_text in _ENGINE_PEAKS.items():
            if name in stats:
                yield GaugeMetricFamily(
                    f"{PREFIX}_engine_{name}", help_text, value=stats[name]
                )
        for name, value in sorted(stats.items()):
            if name not in _ENGINE_GAUGES and name not in _ENGINE_PEAKS:
                yield CounterMetricFamily(
                    f"{PREFIX}_engine_{_metric_name(name)}",
                    f"Engine counter '{name}' since start.",
                    value=value,
                )
        if not engine.ready:
            return  # the audio intake exists once the model (its feature extractor) does
        intake = self._runtime.intake.stats
        counters = {
            "audio_decodes": (intake.decodes, "Audios decoded and featurised."),
            "audio_cache_hits": (intake.cache_hits, "Audios served from the feature cache."),
            "audio_cache_misses": (intake.cache_misses, "Feature cache lookups that missed."),
            "audio_shared_decodes": (
                intake.shared_decodes,
                "Requests that shared another request's decode.",
            ),
        }
        for name, (value, help_text) in counters.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", help_text, value=value)
        yield GaugeMetricFamily(
            f"{PREFIX}_audio_cache_entries",
            "Audios in the feature cache.",
            value=intake.cache_entries,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_audio_cache_bytes",
            "Bytes of features in the cache.",
            value=intake.cache_bytes,
        )


def build_metrics_routes(metrics: ServerMetrics) -> list[Any]:
    @get("/metrics", summary="Prometheus metrics (text exposition format)")
    async def prometheus_metrics() -> Response[bytes]:
        return Response(content=metrics.render(), media_type=EXPOSITION_MEDIA_TYPE)

    return [prometheus_metrics]

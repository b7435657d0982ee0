"""How long the event loop was held: a task asks to be woken every few milliseconds and
records how late it was woken. Lateness is time in which no other request (``/health``
included) could be served, so it is the figure to watch when a body, a decoder or a
library call holds the loop or the GIL.

Exported on ``/metrics`` as a histogram and the largest lateness since start; the
event-loop benchmark reads the latter.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 5)
# Short enough to see a stall of a few ms, long enough to cost nothing (~200 wakes/s).
PROBE_INTERVAL_SECONDS = 0.005


class LoopWatch(Collector):
    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self._prefix = prefix
        self._lag = Histogram(
            f"{prefix}_event_loop_lag_seconds",
            "How late the event loop woke a task that slept "
            f"{PROBE_INTERVAL_SECONDS * 1000:g} ms: time in which it served nothing else.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.worst_seconds = 0.0
        registry.register(self)
        self._task: asyncio.Task[None] | None = None

    def observe(self, lag_seconds: float) -> None:
        self._lag.observe(lag_seconds)
        self.worst_seconds = max(self.worst_seconds, lag_seconds)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(PROBE_INTERVAL_SECONDS)
            self.observe(max(0.0, loop.time() - started - PROBE_INTERVAL_SECONDS))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="loop-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            f"{self._prefix}_event_loop_lag_max_seconds",
            "The longest the event loop was held since start.",
            value=self.worst_seconds,
        )

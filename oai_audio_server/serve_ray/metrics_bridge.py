"""This server's Prometheus metrics, mirrored into Ray's metrics system from inside a
Serve replica, so that the scrape of Ray's metrics export port (every node) carries
them next to Serve's own, labelled ``replica``, ``deployment`` and ``application``.

Every few seconds the bridge reads the replica's own ``/metrics`` (in process, through
the ASGI app: no socket, the same text a direct scrape gets) and sets one Ray gauge per
sample name to the sample's value. Counters and histogram buckets keep their names
(``oas_http_requests_total``, ``..._bucket`` with ``le``) and hold the replica's running
totals, so ``rate()`` and ``histogram_quantile()`` work on them as on a direct scrape;
Ray's exporter prefixes every name with ``ray_``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any, Protocol, cast

from litestar.types import ASGIApp, Message
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

INTERVAL_SECONDS = 5.0
MAX_BODY_BYTES = 16 * 1024 * 1024  # far above any real exposition; a guard, not a limit


class GaugeLike(Protocol):
    def set(self, value: float, tags: dict[str, str] = ...) -> Any: ...


GaugeFactory = Callable[[str, str, tuple[str, ...]], GaugeLike]


def samples(text: str) -> Iterator[tuple[str, str, dict[str, str], float]]:
    """(name, help, labels, value) of every sample worth mirroring."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue  # creation timestamps: no use as a level
            yield sample.name, family.documentation, dict(sample.labels), float(sample.value)


class MetricsMirror:
    """Sets Ray gauges from an exposition text; a gauge per (name, label names)."""

    def __init__(self, make_gauge: GaugeFactory) -> None:
        self._make_gauge = make_gauge
        self._gauges: dict[tuple[str, tuple[str, ...]], GaugeLike] = {}

    def update(self, text: str) -> int:
        count = 0
        for name, help_text, labels, value in samples(text):
            keys = tuple(sorted(labels))
            gauge = self._gauges.get((name, keys))
            if gauge is None:
                gauge = self._make_gauge(name, help_text or name, keys)
                self._gauges[(name, keys)] = gauge
            gauge.set(value, tags=labels)
            count += 1
        return count


async def asgi_get(app: ASGIApp, path: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    """GET ``path`` from an ASGI app in this process; the body, or ValueError."""
    scope: Any = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": headers, "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0), "state": {},
    }
    status = 0
    body = bytearray()
    sent = False

    async def receive() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # a GET has nothing more to say; cancelled with us
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body" and len(body) < MAX_BODY_BYTES:
            body.extend(message.get("body", b""))

    await app(scope, receive, send)
    if status != 200:
        raise ValueError(f"GET {path} answered {status}")
    return bytes(body)


class MetricsBridge:
    """Mirrors ``app``'s /metrics every ``interval`` seconds until :meth:`stop`."""

    def __init__(
        self,
        app: ASGIApp,
        mirror: MetricsMirror,
        api_key: str | None,
        interval: float = INTERVAL_SECONDS,
    ) -> None:
        self._app = app
        self._mirror = mirror
        self._headers = [(b"user-agent", b"oas-ray-metrics-bridge")]
        if api_key:
            self._headers.append((b"authorization", f"Bearer {api_key}".encode()))
        self._interval = interval
        self._stopped = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="oas-metrics")

    async def stop(self) -> None:
        self._stopped.set()
        if self._task is not None:
            await self._task

    async def mirror_once(self) -> int:
        return self._mirror.update((await asgi_get(self._app, "/metrics", self._headers)).decode())

    async def _run(self) -> None:
        # Bounded by the replica's life: stop() ends it.
        while not self._stopped.is_set():
            try:
                await self.mirror_once()
            except Exception:  # a failed round must not end the mirroring
                logger.exception("mirroring /metrics into Ray's metrics failed")
            try:
                await asyncio.wait_for(self._stopped.wait(), self._interval)
            except asyncio.TimeoutError:
                pass


def ray_gauge(name: str, help_text: str, tag_keys: tuple[str, ...]) -> GaugeLike:
    """A Serve gauge: Serve adds the replica, deployment and application tags."""
    from ray.serve.metrics import Gauge

    # Ray annotates tag_keys as Tuple[str] but means any number of names.
    gauge: GaugeLike = Gauge(name, description=help_text, tag_keys=cast(Any, tag_keys))
    return gauge

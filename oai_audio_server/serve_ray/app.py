"""The Serve deployment: each replica is the whole server (its own engine, the same
ASGI app as ``oai-audio-server serve``), behind Serve's HTTP proxy.

``build_app`` is the application builder the Serve config names
(``import_path: oai_audio_server.serve_ray.app:build_app``); its ``args`` are the
server's options (see ``app_args``).
"""

from __future__ import annotations

import logging
from typing import Any, cast

from ray import serve
from ray.serve import Application

from oai_audio_server.http.app import create_app
from oai_audio_server.runtime import create_runtime
from oai_audio_server.serve_ray.app_args import settings_from_app_args
from oai_audio_server.serve_ray.config import DEPLOYMENT_NAME
from oai_audio_server.serve_ray.metrics_bridge import MetricsBridge, MetricsMirror, ray_gauge
from oai_audio_server.serve_ray.replica_gate import ReplicaGate

logger = logging.getLogger(__name__)

# Longest a replica may take to load its model before Serve gives up on it and retries;
# a first download of the real checkpoint takes minutes.
LOAD_TIMEOUT_SECONDS = 3600.0


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class OaiAudioServer:
    """One replica. Serve builds the ASGI app after the constructor, runs its lifespan
    (engine start; completes once the model is loaded) and then routes requests to it."""

    def __init__(self, args: dict[str, Any]) -> None:
        self._settings = settings_from_app_args(args)
        self._runtime = create_runtime(self._settings)
        self._replica = serve.get_replica_context().replica_tag
        self._bridge: MetricsBridge | None = None

    def __serve_build_asgi_app__(self) -> ReplicaGate:
        app = create_app(self._runtime)
        self._bridge = MetricsBridge(app, MetricsMirror(ray_gauge), self._settings.api_key)
        self._bridge.start()
        logger.info("replica %s serves %s", self._replica, self._settings.model)
        return ReplicaGate(app, self._runtime.engine, self._replica, LOAD_TIMEOUT_SECONDS)

    async def check_health(self) -> None:
        """Serve calls this every health_check_period_s once the replica runs; raising
        makes Serve stop the replica and start another. The engine is not ready after
        it died (engine crash): its requests have failed already, new ones would too."""
        engine = self._runtime.engine
        if not engine.ready:
            problem = engine.load_error or "the engine is not ready"
            raise RuntimeError(f"replica {self._replica}: {problem}")

    async def __del__(self) -> None:
        if self._bridge is not None:
            await self._bridge.stop()


def build_app(args: dict[str, Any]) -> Application:
    """Checks the options where the app is built (a wrong flag fails the deploy at once,
    not in every replica), then binds the deployment to them."""
    settings_from_app_args(args)
    application: Application = cast(Any, OaiAudioServer).bind(dict(args))
    return application

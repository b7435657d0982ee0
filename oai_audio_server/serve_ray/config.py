"""The Serve config document (what ``serve run FILE`` and KubeRay's ``serveConfigV2``
take) for a server's settings and its replica options. ``oai-audio-server serve-ray``
deploys exactly this document, and ``--print-config`` prints it."""

from __future__ import annotations

from typing import Any

from oai_audio_server.serve_ray.app_args import app_args
from oai_audio_server.serve_ray.options import ReplicaOptions
from oai_audio_server.settings import Settings

APP_NAME = "oai-audio-server"
DEPLOYMENT_NAME = "OaiAudioServer"
IMPORT_PATH = "oai_audio_server.serve_ray.app:build_app"


# With --max-batch-size 0 a replica sizes its batch from its KV cache when it loads
# (up to 128 rows on a GPU, 8 on a CPU); Serve's routing needs a number up front.
NOMINAL_GPU_BATCH = 64
NOMINAL_CPU_BATCH = 8


def batch_size(settings: Settings, options: ReplicaOptions) -> int:
    """The batch a replica runs: --max-batch-size, or for auto a nominal size."""
    if settings.max_batch_size > 0:
        return settings.max_batch_size
    return NOMINAL_GPU_BATCH if options.num_gpus > 0 else NOMINAL_CPU_BATCH


def default_max_ongoing(settings: Settings, options: ReplicaOptions) -> int:
    """A full batch running plus a full batch waiting to join it, but never more than
    the replica admits (batch + --max-queue): Serve holds the rest, and sends each to
    the first replica with room, instead of a replica answering 429."""
    batch = batch_size(settings, options)
    return min(2 * batch, batch + settings.max_queue)


def deployment_config(settings: Settings, options: ReplicaOptions) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": (
            options.max_ongoing_requests or default_max_ongoing(settings, options)
        ),
        "max_queued_requests": (
            options.max_queued_requests
            if options.max_queued_requests is not None
            else settings.max_queue
        ),
    }
    if options.autoscaling:
        low = options.min_replicas if options.min_replicas is not None else 1
        scaling: dict[str, Any] = {
            "min_replicas": low,
            "max_replicas": options.max_replicas if options.max_replicas is not None else low,
            # A replica is "full" when its batch is: add one before requests queue.
            "target_ongoing_requests": (
                options.target_ongoing_requests or float(batch_size(settings, options))
            ),
        }
        if options.upscale_delay_s is not None:
            scaling["upscale_delay_s"] = options.upscale_delay_s
        if options.downscale_delay_s is not None:
            scaling["downscale_delay_s"] = options.downscale_delay_s
        config["autoscaling_config"] = scaling
    else:
        config["num_replicas"] = options.replicas
    config["ray_actor_options"] = {"num_gpus": options.num_gpus, "num_cpus": options.num_cpus}
    config["health_check_period_s"] = options.health_check_period_s
    config["health_check_timeout_s"] = options.health_check_timeout_s
    config["graceful_shutdown_timeout_s"] = settings.shutdown_timeout
    return config


def replica_settings(settings: Settings, options: ReplicaOptions) -> Settings:
    """A CPU replica computes with the CPUs Ray gives it, not all of the node's (several
    replicas share a node)."""
    if options.num_gpus == 0 and settings.cpu_threads == 0:
        return settings.replace(cpu_threads=max(1, int(options.num_cpus)))
    return settings


def serve_config(settings: Settings, options: ReplicaOptions) -> dict[str, Any]:
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": settings.host, "port": settings.port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": app_args(replica_settings(settings, options)),
                "deployments": [deployment_config(settings, options)],
            }
        ],
    }

"""How many replicas, of what size, and when Serve adds or removes them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaOptions:
    """Deployment options of the Serve application; ``None`` means "derive it from the
    server's own limits" (see :func:`oai_audio_server.serve_ray.config.deployment_config`)."""

    replicas: int = 1
    min_replicas: int | None = None  # autoscaling when min_replicas or max_replicas is set
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    max_ongoing_requests: int | None = None
    max_queued_requests: int | None = None
    upscale_delay_s: float | None = None
    downscale_delay_s: float | None = None
    num_gpus: float = 1.0
    num_cpus: float = 1.0
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def check(self) -> None:
        """Raise ValueError for options Serve would refuse later, with the flag's name."""
        if self.replicas < 1:
            raise ValueError("--replicas must be at least 1")
        if self.autoscaling:
            low = self.min_replicas if self.min_replicas is not None else 1
            high = self.max_replicas if self.max_replicas is not None else low
            if low < 0 or high < 1 or low > high:
                raise ValueError(
                    "--min-replicas and --max-replicas need 0 <= min <= max and max >= 1"
                )
        if self.target_ongoing_requests is not None and self.target_ongoing_requests <= 0:
            raise ValueError("--target-ongoing-requests must be above 0")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < 1:
            raise ValueError("--max-ongoing-requests must be at least 1")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError("--num-gpus and --num-cpus cannot be negative")

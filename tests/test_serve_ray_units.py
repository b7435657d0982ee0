"""The serve-ray pieces that need no Ray cluster: options -> Serve config, settings <->
application args, the replica's readiness gate and the metrics mirror."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from oai_audio_server.serve_ray.app_args import app_args, settings_from_app_args
from oai_audio_server.serve_ray.config import deployment_config, serve_config
from oai_audio_server.serve_ray.metrics_bridge import MetricsMirror, asgi_get
from oai_audio_server.serve_ray.options import ReplicaOptions
from oai_audio_server.serve_ray.replica_gate import ReplicaGate
from oai_audio_server.settings import Settings

# ---------------------------------------------------------------------- config


def test_args_carry_non_defaults_and_come_back_as_the_same_settings() -> None:
    settings = Settings(model="/m", max_batch_size=3, engine_process=False,
                        allowed_origins=("https://a.example", "https://b.example"),
                        dtype="float32", request_timeout=12.5)
    args = app_args(settings)
    assert args == {"model": "/m", "dtype": "float32", "max_batch_size": 3,
                    "engine_process": False, "request_timeout": 12.5,
                    "allowed_origins": ["https://a.example", "https://b.example"]}
    assert settings_from_app_args(args, environ={}) == settings


def test_the_api_key_comes_from_the_replicas_environment_only() -> None:
    settings = Settings(model="/m", api_key="secret", host="0.0.0.0", port=9)
    args = app_args(settings)
    assert "api_key" not in args and "host" not in args and "port" not in args
    restored = settings_from_app_args(args, environ={"OAS_API_KEY": "secret"})
    assert restored.api_key == "secret"


@pytest.mark.parametrize("args", [{"model": "/m", "nonsense": 1},
                                  {"model": "/m", "dtype": "float8"},
                                  {"model": "/m", "max_batch_size": "many"}])
def test_bad_args_are_refused(args: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        settings_from_app_args(args, environ={})


def test_defaults_follow_the_servers_limits() -> None:
    settings = Settings(model="/m", max_batch_size=8, max_queue=3)
    config = deployment_config(settings, ReplicaOptions(replicas=2))
    assert config["num_replicas"] == 2 and "autoscaling_config" not in config
    assert config["max_ongoing_requests"] == 11  # a batch and the whole queue, no more
    assert config["max_queued_requests"] == 3
    scaled = deployment_config(settings, ReplicaOptions(min_replicas=1, max_replicas=3))
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3,
                                            "target_ongoing_requests": 8.0}
    assert scaled["max_ongoing_requests"] == 11


def test_flags_override_the_defaults() -> None:
    settings = Settings(model="/m", max_batch_size=4)
    options = ReplicaOptions(max_replicas=5, target_ongoing_requests=2,
                             max_ongoing_requests=6, upscale_delay_s=1, num_gpus=0, num_cpus=2)
    config = serve_config(settings, options)
    deployment = config["applications"][0]["deployments"][0]
    assert deployment["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 5, "target_ongoing_requests": 2,
        "upscale_delay_s": 1}
    assert deployment["max_ongoing_requests"] == 6
    assert deployment["ray_actor_options"] == {"num_gpus": 0, "num_cpus": 2}
    # A CPU replica computes with the CPUs Ray gives it.
    assert config["applications"][0]["args"]["cpu_threads"] == 2


@pytest.mark.parametrize("options", [ReplicaOptions(replicas=0),
                                     ReplicaOptions(min_replicas=3, max_replicas=2),
                                     ReplicaOptions(max_replicas=2, target_ongoing_requests=0),
                                     ReplicaOptions(num_gpus=-1)])
def test_impossible_options_are_refused(options: ReplicaOptions) -> None:
    with pytest.raises(ValueError):
        options.check()


# ---------------------------------------------------------------------- readiness gate


class FakeEngine:
    def __init__(self) -> None:
        self.ready = False
        self.load_error: BaseException | None = None


async def lifespan_app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "lifespan.startup.complete"})


async def run_startup(gate: ReplicaGate) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await gate({"type": "lifespan"}, receive, send)
    return sent


def test_startup_completes_only_once_the_model_is_loaded() -> None:
    engine = FakeEngine()

    async def scenario() -> list[dict[str, Any]]:
        task = asyncio.create_task(run_startup(ReplicaGate(lifespan_app, engine, "r1", 30)))
        await asyncio.sleep(0.3)
        assert not task.done()  # still loading: Serve must not count the replica yet
        engine.ready = True
        return await asyncio.wait_for(task, 10)

    assert asyncio.run(scenario()) == [{"type": "lifespan.startup.complete"}]


def test_startup_fails_when_the_model_fails_or_takes_too_long() -> None:
    engine = FakeEngine()
    engine.load_error = RuntimeError("no such checkpoint")
    sent = asyncio.run(run_startup(ReplicaGate(lifespan_app, engine, "r1", 30)))
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "no such checkpoint" in sent[0]["message"]
    slow = asyncio.run(run_startup(ReplicaGate(lifespan_app, FakeEngine(), "r1", 0.2)))
    assert slow[0]["type"] == "lifespan.startup.failed"


async def hello_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"oas_up 1.0\n"})


def test_replies_name_their_replica() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(ReplicaGate(hello_app, FakeEngine(), "abc123", 1)({"type": "http"}, None, send))
    assert (b"x-oas-replica", b"abc123") in sent[0]["headers"]


# ---------------------------------------------------------------------- metrics mirror


class FakeGauge:
    def __init__(self, name: str, tag_keys: tuple[str, ...]) -> None:
        self.name, self.tag_keys = name, tag_keys
        self.values: dict[tuple[tuple[str, str], ...], float] = {}

    def set(self, value: float, tags: dict[str, str] = {}) -> None:  # noqa: B006
        assert set(tags) == set(self.tag_keys)
        self.values[tuple(sorted(tags.items()))] = value


EXPOSITION = """\
# HELP oas_http_requests_total HTTP requests.
# TYPE oas_http_requests_total counter
oas_http_requests_total{method="GET",route="/health",status="200"} 3.0
oas_http_requests_created{method="GET",route="/health",status="200"} 1.7e9
# HELP oas_ttft_seconds Time to first token.
# TYPE oas_ttft_seconds histogram
oas_ttft_seconds_bucket{le="0.5"} 1.0
oas_ttft_seconds_bucket{le="+Inf"} 2.0
oas_ttft_seconds_count 2.0
oas_ttft_seconds_sum 1.5
# HELP oas_model_ready Loaded.
# TYPE oas_model_ready gauge
oas_model_ready 1.0
"""


def test_mirror_sets_a_gauge_per_sample_with_its_labels() -> None:
    gauges: dict[str, FakeGauge] = {}

    def make(name: str, help_text: str, keys: tuple[str, ...]) -> FakeGauge:
        gauges[name] = FakeGauge(name, keys)
        return gauges[name]

    mirror = MetricsMirror(make)
    assert mirror.update(EXPOSITION) == 6  # the _created sample is left out
    assert sorted(gauges) == ["oas_http_requests_total", "oas_model_ready",
                              "oas_ttft_seconds_bucket", "oas_ttft_seconds_count",
                              "oas_ttft_seconds_sum"]
    requests = gauges["oas_http_requests_total"].values
    assert requests == {(("method", "GET"), ("route", "/health"), ("status", "200")): 3.0}
    assert gauges["oas_ttft_seconds_bucket"].values[(("le", "+Inf"),)] == 2.0
    mirror.update(EXPOSITION.replace("} 3.0", "} 5.0"))
    assert list(requests.values()) == [5.0]  # the same gauge, the new total
    assert len(gauges) == 5


def test_asgi_get_reads_the_apps_own_reply() -> None:
    assert asyncio.run(asgi_get(hello_app, "/metrics", [])) == b"oas_up 1.0\n"

    async def refusing(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 401, "headers": []})
        await send({"type": "http.response.body", "body": b"no"})

    with pytest.raises(ValueError):
        asyncio.run(asgi_get(refusing, "/metrics", []))


def test_auto_batch_size_gets_a_nominal_routing_target() -> None:
    from oai_audio_server.serve_ray.config import deployment_config
    from oai_audio_server.serve_ray.options import ReplicaOptions

    settings = Settings(model="/m", max_batch_size=0, max_queue=64)
    gpu = deployment_config(settings, ReplicaOptions(min_replicas=1, max_replicas=2))
    assert gpu["autoscaling_config"]["target_ongoing_requests"] == 64.0
    assert gpu["max_ongoing_requests"] == 128
    cpu = deployment_config(settings, ReplicaOptions(min_replicas=1, max_replicas=2,
                                                     num_gpus=0))
    assert cpu["autoscaling_config"]["target_ongoing_requests"] == 8.0

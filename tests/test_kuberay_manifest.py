"""deploy/kuberay-rayservice.yaml: a RayService whose serveConfigV2 is what
``oai-audio-server serve-ray --print-config`` makes of the command it records."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed: pip install -e '.[ray]'")

from oai_audio_server.cli import build_parser  # noqa: E402
from oai_audio_server.flags import settings_from_namespace  # noqa: E402
from oai_audio_server.serve_ray.command import options_from_namespace  # noqa: E402
from oai_audio_server.serve_ray.config import (  # noqa: E402
    APP_NAME,
    DEPLOYMENT_NAME,
    IMPORT_PATH,
    serve_config,
)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMMAND_ANNOTATION = "oai-audio-server/serve-ray-command"


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DEPLOY / "kuberay-rayservice.yaml").read_text())
    return document


def generated_config(command: str) -> dict[str, Any]:
    words = shlex.split(command)
    assert words[:2] == ["oai-audio-server", "serve-ray"]
    args = build_parser(environ={}).parse_args(words[1:])
    return serve_config(settings_from_namespace(args), options_from_namespace(args))


def test_is_a_rayservice(manifest: dict[str, Any]) -> None:
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayService"
    assert manifest["metadata"]["name"]
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert cluster["workerGroupSpecs"]


def test_serve_config_is_what_the_cli_generates(manifest: dict[str, Any]) -> None:
    command = manifest["metadata"]["annotations"][COMMAND_ANNOTATION]
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert embedded == generated_config(command)
    application = embedded["applications"][0]
    assert application["name"] == APP_NAME
    assert application["import_path"] == IMPORT_PATH
    assert importlib.util.find_spec(IMPORT_PATH.split(":")[0]) is not None
    assert application["deployments"][0]["name"] == DEPLOYMENT_NAME
    assert "api_key" not in application["args"]  # a secret never sits in the config
    assert embedded["http_options"]["host"] == "0.0.0.0"  # reachable from the Service


def test_gpu_workers_fit_one_replica_each(manifest: dict[str, Any]) -> None:
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    deployment = embedded["applications"][0]["deployments"][0]
    actor = deployment["ray_actor_options"]
    assert actor["num_gpus"] == 1
    scaling = deployment["autoscaling_config"]
    for group in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        requests = container["resources"]["requests"]
        assert int(requests["nvidia.com/gpu"]) == actor["num_gpus"]
        assert float(requests["cpu"]) >= actor["num_cpus"]
        assert group["maxReplicas"] >= scaling["max_replicas"]
        env = {item["name"]: item for item in container.get("env", [])}
        assert "secretKeyRef" in env["OAS_API_KEY"]["valueFrom"]


def test_every_pod_exports_metrics(manifest: dict[str, Any]) -> None:
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        port = group["rayStartParams"]["metrics-export-port"]
        ports = group["template"]["spec"]["containers"][0]["ports"]
        assert {"containerPort": int(port), "name": "metrics"} in ports
    # The head runs Serve's controller and proxy, never a replica.
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_image_and_ray_versions_agree(manifest: dict[str, Any]) -> None:
    ray_version = manifest["spec"]["rayClusterConfig"]["rayVersion"]
    dockerfile = (DEPLOY / "Dockerfile.ray").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+?)-", dockerfile, re.M)
    assert base is not None and base.group(1) == ray_version

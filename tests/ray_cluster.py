"""A local Ray instance for the Ray Serve tests: ``ray start --head --block`` in a
subprocess with its own ports and temp dir, and the Serve helpers the tests share.

Teardown ends only this instance (SIGTERM to ``ray start --block``, which stops what it
started; then any process left of this instance's raylet, by pid), never other Ray
instances on the machine."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from server_process import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS = 120.0
REPLICA_PREFIX = "ServeReplica:oai-audio-server:OaiAudioServer"


@dataclass
class RayCluster:
    process: subprocess.Popen[bytes]
    address: str
    metrics_port: int
    temp_dir: Path
    log_path: Path

    def env(self) -> dict[str, str]:
        """The environment for a command that works on this instance, as the README's
        ``RAY_ADDRESS=... oai-audio-server serve-ray ...``."""
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        return {**os.environ, "PYTHONPATH": path, "RAY_ADDRESS": self.address,
                "RAY_USAGE_STATS_ENABLED": "0"}

    def own_processes(self) -> list[psutil.Process]:
        """This instance's processes: those naming its temp dir, and their children."""
        found: dict[int, psutil.Process] = {}
        for process in psutil.process_iter(["cmdline"]):
            try:
                if str(self.temp_dir) in " ".join(process.info["cmdline"] or []):
                    found[process.pid] = process
                    for child in process.children(recursive=True):
                        found[child.pid] = child
            except psutil.Error:
                continue
        return list(found.values())

    def replica_processes(self) -> list[psutil.Process]:
        """Live Serve replica actors of this instance (an actor's title is its class)."""
        replicas = []
        for process in self.own_processes():
            try:
                title = (process.cmdline() or [""])[0]
                if REPLICA_PREFIX in title and process.status() != psutil.STATUS_ZOMBIE:
                    replicas.append(process)
            except psutil.Error:
                continue
        return replicas


def ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


@contextmanager
def ray_cluster(num_cpus: int = 4) -> Iterator[RayCluster]:
    # Short: Ray's socket paths live under it (Unix sockets allow ~107 characters).
    temp_dir = Path(tempfile.mkdtemp(prefix="oas-ray-", dir="/tmp"))
    port, metrics_port = free_port(), free_port()
    command = [
        ray_executable(), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--num-cpus", str(num_cpus), "--num-gpus", "0", "--include-dashboard", "false",
        "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        "--metrics-export-port", str(metrics_port), "--temp-dir", str(temp_dir),
    ]
    log_path = temp_dir / "ray-start.log"
    cluster = RayCluster(
        process=_popen(command, log_path, temp_dir),
        address=f"127.0.0.1:{port}", metrics_port=metrics_port, temp_dir=temp_dir,
        log_path=log_path,
    )
    try:
        _wait_started(cluster)
        yield cluster
    finally:
        stop_cluster(cluster)


def _popen(command: list[str], log_path: Path, temp_dir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=temp_dir)


def _wait_started(cluster: RayCluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if cluster.process.poll() is not None:
            raise RuntimeError(f"ray start exited:\n{cluster.log_path.read_text()}")
        if "ray stop" in cluster.log_path.read_text(errors="replace"):
            return  # its closing hint: the head node is up
        time.sleep(0.5)
    raise TimeoutError(f"Ray not started after {START_TIMEOUT_SECONDS} s")


def stop_cluster(cluster: RayCluster, timeout: float = 60.0) -> None:
    leftovers = cluster.own_processes()
    if cluster.process.poll() is None:
        cluster.process.send_signal(signal.SIGTERM)
        try:
            cluster.process.wait(timeout)
        except subprocess.TimeoutExpired:
            cluster.process.kill()
            cluster.process.wait(10)
    for process in leftovers + cluster.own_processes():
        try:
            process.kill()
        except psutil.Error:
            pass
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def serve_status(address: str) -> Any:
    """Serve's status, asked from this process (a Ray driver connected to ``address``)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    return serve.status()


def running_replicas(address: str, app: str = "oai-audio-server") -> int:
    application = serve_status(address).applications.get(app)
    if application is None or str(application.status).split(".")[-1] != "RUNNING":
        return 0
    states = next(iter(application.deployments.values())).replica_states
    return int(states.get("RUNNING", 0)) if len(states) == 1 else 0

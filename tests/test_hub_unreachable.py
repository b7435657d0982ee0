"""With no network, ``serve`` with a hub id stops within 30 s with one line that names
the hub and says a local checkpoint directory works too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from server_process import free_port

LIMIT_SECONDS = 30  # the bound issue #16 names


@pytest.mark.parametrize(("hub", "names"), [
    ("huggingface", ["Hugging Face"]),
    ("modelscope", ["ModelScope"]),
    ("auto", ["Hugging Face", "ModelScope"]),
])
def test_unreachable_hub_is_one_clear_line(tmp_path: Path, hub: str, names: list[str]) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # bound and released: nothing listens
    env = {**os.environ, "HF_ENDPOINT": closed, "MODELSCOPE_ENDPOINT": closed,
           "HF_HOME": str(tmp_path / "hf"), "MODELSCOPE_CACHE": str(tmp_path / "ms"),
           "OAS_HUB": hub}
    env.pop("OAS_MODEL", None)
    done = subprocess.run(
        [sys.executable, "-m", "oai_audio_server", "serve", "--port", str(free_port())],
        capture_output=True, text=True, env=env, timeout=LIMIT_SECONDS,
    )
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("oai-audio-server:")]
    assert len(errors) == 1, done.stderr
    line = errors[0]
    assert "Qwen/Qwen-Audio-Chat" in line and "local checkpoint directory" in line
    for name in names:
        assert f"{name} ({closed})" in line
    assert "Traceback" not in done.stderr

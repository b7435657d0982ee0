"""Every example in examples/ runs against the tiny test model server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from media import tone, wav_bytes
from server_process import ServerProcess

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PYTHON_EXAMPLES = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


def run(server: ServerProcess, *command: str) -> str:
    env = {**os.environ, "OAS_BASE_URL": server.api_url, "OAS_MODEL": "qwen-audio-chat"}
    done = subprocess.run(command, cwd=EXAMPLES, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_every_python_example_is_covered() -> None:
    assert set(PYTHON_EXAMPLES) == {"chat_sdk.py", "chat_stream_sdk.py",
                                    "multi_turn_audio.py", "tutorial_requests.py"}


@pytest.mark.parametrize("name", PYTHON_EXAMPLES)
def test_python_example(server: ServerProcess, name: str) -> None:
    output = run(server, sys.executable, name)
    assert output.strip()
    if name == "multi_turn_audio.py":
        assert "turn 1:" in output and "turn 2:" in output
    if name == "tutorial_requests.py":
        assert "[success in" in output
    if name == "chat_stream_sdk.py":
        assert "[completion tokens" in output


def test_python_example_with_an_audio_file(server: ServerProcess, tmp_path: Path) -> None:
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone(1.0, 300.0)))
    assert "[prompt tokens" in run(server, sys.executable, "chat_sdk.py", str(clip))


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_stream(server: ServerProcess) -> None:
    output = run(server, "sh", "curl_stream.sh")
    assert "data: [DONE]" in output and "chat.completion.chunk" in output


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_fetch_stream(server: ServerProcess) -> None:
    assert "[done]" in run(server, "node", "fetch_stream.mjs")

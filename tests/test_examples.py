"""Every example in examples/ runs as its own comment says, against a server started
on a checkpoint directory with no other flags: the examples find the model name at
/v1/models when OAS_MODEL is not set."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from media import tone, wav_bytes
from server_process import ServerProcess, running_server

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PYTHON_EXAMPLES = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
DOCUMENTED_URL = "http://127.0.0.1:8000/v1"
RUNNERS = {"python": sys.executable, "sh": "sh", "node": "node"}


@pytest.fixture(scope="module")
def plain_server(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """``oai-audio-server serve DIR``: the model's name is the directory."""
    with running_server(tiny_checkpoint, tmp_path_factory.mktemp("examples")) as process:
        yield process


def documented_command(name: str) -> list[str]:
    """The command line in the example's header comment, optional [args] left out."""
    text = (EXAMPLES / name).read_text()
    pattern = rf"^\W*(OAS_BASE_URL=\S+ \w+ examples/{re.escape(name)})\b"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name} does not document how to run it"
    return shlex.split(match.group(1))


def run_as_documented(server: ServerProcess, name: str, *args: str) -> str:
    assignment, runner, script = documented_command(name)
    assert assignment == f"OAS_BASE_URL={DOCUMENTED_URL}"
    env = {**os.environ, "OAS_BASE_URL": server.api_url}
    env.pop("OAS_MODEL", None)
    done = subprocess.run([RUNNERS[runner], script, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_every_python_example_is_covered() -> None:
    assert set(PYTHON_EXAMPLES) == {"chat_sdk.py", "chat_stream_sdk.py",
                                    "multi_turn_audio.py", "realtime_transcribe.py",
                                    "structured_output.py", "tutorial_requests.py"}


def test_the_server_name_is_the_directory(plain_server: ServerProcess,
                                          tiny_checkpoint: Path) -> None:
    import httpx

    models = httpx.get(plain_server.api_url + "/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [str(tiny_checkpoint)]


@pytest.mark.parametrize("name", PYTHON_EXAMPLES)
def test_python_example(plain_server: ServerProcess, name: str) -> None:
    output = run_as_documented(plain_server, name)
    assert output.strip()
    if name == "multi_turn_audio.py":
        assert "turn 1:" in output and "turn 2:" in output
    if name == "tutorial_requests.py":
        assert "[success in" in output
    if name == "realtime_transcribe.py":
        assert "[turn 1 done]" in output
    if name == "chat_stream_sdk.py":
        assert "[completion tokens" in output
    if name == "structured_output.py":  # the model's reply, parsed by the SDK
        fields = json.loads(output.strip().splitlines()[-1])
        assert set(fields) == {"speech", "language", "mood"}


def test_python_example_with_an_audio_file(plain_server: ServerProcess, tmp_path: Path) -> None:
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone(1.0, 300.0)))
    assert "[prompt tokens" in run_as_documented(plain_server, "chat_sdk.py", str(clip))


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_stream(plain_server: ServerProcess) -> None:
    output = run_as_documented(plain_server, "curl_stream.sh")
    assert "data: [DONE]" in output and "chat.completion.chunk" in output


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_fetch_stream(plain_server: ServerProcess) -> None:
    assert "[done]" in run_as_documented(plain_server, "fetch_stream.mjs")

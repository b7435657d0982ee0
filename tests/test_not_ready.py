"""Before the model is loaded (here: a checkpoint that cannot load), the server says so."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from server_process import running_server


def test_unloadable_model_is_503_with_the_reason(tmp_path: Path) -> None:
    broken = tmp_path / "broken-checkpoint"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with running_server(broken, tmp_path, wait=False) as server:
        deadline = time.monotonic() + 90
        health = None
        while time.monotonic() < deadline:
            try:
                health = httpx.get(server.base_url + "/health", timeout=2)
            except httpx.HTTPError:
                time.sleep(0.25)
                continue
            if "failed to load" in health.text:
                break
            time.sleep(0.25)
        assert health is not None and health.status_code == 503
        error = health.json()["error"]
        assert error["code"] == "model_load_failed"
        assert "retry-after" not in health.headers  # waiting does not fix a broken model
        assert httpx.get(server.base_url + "/live").status_code == 200
        body = {"model": str(broken), "messages": [{"role": "user", "content": "hi"}]}
        reply = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=10)
        assert reply.status_code == 503
        assert "retry-after" not in reply.headers
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
        message = reply.json()["error"]["message"]
        assert "failed to load" in message and "loading the checkpoint in" in message
        assert "\n" not in message and "still loading" not in message
        log = server.log()
        clear = log.index("model failed to load: loading the checkpoint in")
        assert clear < log.index("Traceback"), "the one clear line comes before the traceback"


def test_a_hub_failure_names_the_hub_and_the_local_directory_alternative() -> None:
    from oai_audio_server.engine.load_report import explain_load_failure

    try:
        try:
            raise OSError("Name or service not known")
        except OSError as cause:
            raise RuntimeError("snapshot_download failed") from cause
    except RuntimeError as error:
        line = explain_load_failure("qwen/Qwen-Audio-Chat", error)
    assert "ModelScope" in line and "OSError: Name or service not known" in line
    assert "local checkpoint directory" in line


def test_model_that_is_neither_a_directory_nor_downloadable_fails_fast(tmp_path: Path) -> None:
    from oai_audio_server.engine.loader import resolve_model_dir

    with pytest.raises(FileNotFoundError):
        resolve_model_dir(str(tmp_path / "missing"))

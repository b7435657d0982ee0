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
        assert health.json()["error"]["code"] == "model_not_ready"
        assert httpx.get(server.base_url + "/live").status_code == 200
        body = {"model": str(broken), "messages": [{"role": "user", "content": "hi"}]}
        reply = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=10)
        assert reply.status_code == 503
        assert reply.headers["retry-after"]
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_model_that_is_neither_a_directory_nor_downloadable_fails_fast(tmp_path: Path) -> None:
    from oai_audio_server.engine.loader import resolve_model_dir

    with pytest.raises(FileNotFoundError):
        resolve_model_dir(str(tmp_path / "missing"))

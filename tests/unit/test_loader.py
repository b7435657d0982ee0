from __future__ import annotations

from pathlib import Path

import pytest
import torch

import oai_audio_server.hub
from oai_audio_server.engine.loader import pick_device, pick_dtype, resolve_model_dir


def test_local_directory_is_used_as_is(tmp_path: Path) -> None:
    assert resolve_model_dir(str(tmp_path)) == tmp_path


def test_model_id_goes_to_the_hub_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str, str | None]] = []

    def resolve(model: str, hub: str, download_dir: str | None) -> Path:
        calls.append((model, hub, download_dir))
        return tmp_path

    monkeypatch.setattr(oai_audio_server.hub, "resolve", resolve)
    assert resolve_model_dir("Qwen/Qwen-Audio-Chat", "/models", "modelscope") == tmp_path
    assert calls == [("Qwen/Qwen-Audio-Chat", "modelscope", "/models")]


def test_device_and_dtype_choice_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(RuntimeError, match="no CUDA device"):
        pick_device("cuda:1")


def test_device_and_dtype_choice_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda:0")
    assert pick_device("cuda:1") == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert pick_dtype("auto", torch.device("cuda:0")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert pick_dtype("auto", torch.device("cuda:0")) == torch.float16


def test_cpu_threads_keep_a_core_for_the_server() -> None:
    from oai_audio_server.engine.loader import cpu_thread_count

    assert cpu_thread_count(0, cores=2) == 1
    assert cpu_thread_count(0, cores=1) == 1
    assert cpu_thread_count(0, cores=16) == 15
    assert cpu_thread_count(3, cores=16) == 3

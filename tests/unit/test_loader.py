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
    assert pick_device("CPU") == torch.device("cpu")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    for asked in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="no CUDA device.*--device cpu or auto"):
            pick_device(asked)


def fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int, current: int = 0) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


def test_every_cuda_spelling_gets_an_explicit_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda.set_device refuses torch.device("cuda") (no index), so none leaves."""
    fake_cuda(monkeypatch, count=2, current=1)
    assert pick_device("auto") == torch.device("cuda:1")
    assert pick_device("cuda") == torch.device("cuda:1")
    assert pick_device("cuda:0") == torch.device("cuda:0")
    assert pick_device(" CUDA:1 ") == torch.device("cuda:1")
    for device in map(pick_device, ("auto", "cuda", "cuda:0")):
        assert device.index is not None


def test_a_cuda_index_is_checked_against_the_device_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_cuda(monkeypatch, count=2)
    with pytest.raises(ValueError, match="has 2 CUDA device.*cuda:0 to cuda:1"):
        pick_device("cuda:2")


@pytest.mark.parametrize("asked", ["gpu", "cuda:x", "cuda:", "cuda:-1", "mps", "cuda:0:1", ""])
def test_other_spellings_are_refused_with_what_to_pass(
    monkeypatch: pytest.MonkeyPatch, asked: str
) -> None:
    fake_cuda(monkeypatch, count=1)
    with pytest.raises(ValueError, match="--device cpu, auto"):
        pick_device(asked)


def test_auto_on_a_fresh_process_does_not_start_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, count=1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("CUDA started"))
    assert pick_device("auto") == torch.device("cuda:0")
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

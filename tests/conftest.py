from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from official_checkpoint import build_official_checkpoint, official_repo
from qwen2_tiny import build_qwen2_checkpoint
from server_process import SUITE_FLAGS, ServerProcess, running_server
from tiny_model import build_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint every server test runs on: built from this repo's test remote
    code, or, when OAS_QWEN_AUDIO_REPO names a checkout of QwenLM/Qwen-Audio, from the
    official remote code (so the same suite checks the server against the real code)."""
    target = tmp_path_factory.mktemp("tiny_qwen_audio") / "ckpt"
    repo = official_repo()
    if repo is not None:
        return build_official_checkpoint(repo, target)
    return build_tiny_checkpoint(target, seed=0)


@pytest.fixture(scope="session")
def server(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One shared server with default settings, for tests that do not change them."""
    with running_server(
        tiny_checkpoint,
        tmp_path_factory.mktemp("logs"),
        *SUITE_FLAGS,
    ) as process:
        yield process


@pytest.fixture(scope="session")
def qwen2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2-Audio checkpoint written by transformers' own classes."""
    return build_qwen2_checkpoint(tmp_path_factory.mktemp("tiny_qwen2_audio") / "ckpt", seed=0)

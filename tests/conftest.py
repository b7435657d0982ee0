from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from server_process import ServerProcess, running_server
from tiny_model import build_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen_audio") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def server(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One shared server with default settings, for tests that do not change them."""
    with running_server(
        tiny_checkpoint,
        tmp_path_factory.mktemp("logs"),
        "--served-model-name", "qwen-audio-chat,whisper-1",
        "--max-body-bytes", str(8 * 1024 * 1024),
    ) as process:
        yield process

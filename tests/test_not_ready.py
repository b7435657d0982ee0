"""How a failed load is explained (the server itself: tests/test_start_checks.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


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

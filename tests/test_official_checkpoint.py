"""Opt-in: with OAS_QWEN_AUDIO_REPO set, the session checkpoint really is the official code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from official_checkpoint import REPO_ENV, official_repo

pytestmark = pytest.mark.skipif(
    official_repo() is None, reason=f"set {REPO_ENV} to a QwenLM/Qwen-Audio checkout"
)


def test_checkpoint_runs_the_official_remote_code(tiny_checkpoint: Path) -> None:
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"
    assert (tiny_checkpoint / "modeling_qwen.py").read_bytes() == (
        official_repo() / "modeling_qwen.py"  # type: ignore[operator]
    ).read_bytes()

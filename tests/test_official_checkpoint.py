"""Opt-in: with OAS_QWEN_AUDIO_REPO set, the session checkpoint is built by the official
code, and the native engine loads it by its tensor names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from official_checkpoint import REPO_ENV, official_repo

from oai_audio_server.engine.loader import load_bundle
from oai_audio_server.settings import Settings

pytestmark = pytest.mark.skipif(
    official_repo() is None, reason=f"set {REPO_ENV} to a QwenLM/Qwen-Audio checkout"
)


def test_the_official_checkpoint_loads_natively(tiny_checkpoint: Path) -> None:
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"
    assert (tiny_checkpoint / "modeling_qwen.py").read_bytes() == (
        official_repo() / "modeling_qwen.py"  # type: ignore[operator]
    ).read_bytes()
    bundle = load_bundle(Settings(model=str(tiny_checkpoint), device="cpu"))
    assert bundle.tokenizer.audio_start_id == config["audio"]["audio_start_id"]
    assert len(bundle.tokenizer) == 155165  # the published vocabulary

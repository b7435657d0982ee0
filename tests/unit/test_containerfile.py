"""The Containerfile keeps the promises the README makes (no Docker engine here to build)."""

from __future__ import annotations

from pathlib import Path

TEXT = (Path(__file__).resolve().parents[2] / "Containerfile").read_text()


def instructions(name: str) -> list[str]:
    return [line for line in TEXT.splitlines() if line.startswith(name + " ")]


def test_gpu_base_non_root_volume_health_and_entrypoint() -> None:
    assert "cuda" in instructions("FROM")[0]
    users = instructions("USER")
    assert users and users[-1].split()[1] not in ("root", "0")
    assert instructions("VOLUME") and "/models" in instructions("VOLUME")[0]
    assert "/health" in TEXT.split("HEALTHCHECK", 1)[1]
    assert instructions("ENTRYPOINT") == ['ENTRYPOINT ["oai-audio-server", "serve"]']
    assert "EXPOSE 8000" in TEXT


def test_no_weights_or_tests_are_copied_in() -> None:
    copied = " ".join(instructions("COPY"))
    assert "oai_audio_server" in copied
    for unwanted in ("tests", "*.safetensors", "*.bin", " . "):
        assert unwanted not in copied

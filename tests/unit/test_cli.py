from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from oai_audio_server.cli import build_parser, settings_from_args
from oai_audio_server.settings import Settings, env_name, setting_fields


def test_flags_fill_settings() -> None:
    settings = settings_from_args(
        ["serve", "/models/qwen", "--port", "9000", "--dtype", "bfloat16",
         "--allowed-media-domains", "a.example, b.example", "--log-json"], environ={}
    )
    assert settings.model == "/models/qwen"
    assert settings.port == 9000 and settings.dtype == "bfloat16"
    assert settings.allowed_media_domains == ("a.example", "b.example")
    assert settings.log_json is True
    assert settings.model_name == "/models/qwen"  # served name defaults to MODEL as given


def test_environment_variables_and_flag_precedence() -> None:
    env = {"OAS_MODEL": "qwen/Qwen-Audio-Chat", "OAS_PORT": "8123", "OAS_LOG_JSON": "true",
           "OAS_MAX_AUDIO_SECONDS": "90", "OAS_SERVED_MODEL_NAME": "qwen,whisper-1"}
    settings = settings_from_args(["serve"], environ=env)
    assert settings.model == "qwen/Qwen-Audio-Chat" and settings.port == 8123
    assert settings.log_json and settings.max_audio_seconds == 90.0
    assert settings.served_names == ("qwen", "whisper-1") and settings.model_name == "qwen"
    assert settings_from_args(["serve", "--port", "1"], environ=env).port == 1


def test_bad_values_are_usage_errors() -> None:
    with pytest.raises(SystemExit):
        settings_from_args(["serve", "m", "--dtype", "int4"], environ={})
    with pytest.raises(ValueError):
        settings_from_args(["serve", "m"], environ={"OAS_LOG_JSON": "maybe"})


def test_every_setting_has_a_flag_and_variable_in_help() -> None:
    serve = build_parser({})._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    text = serve.format_help()
    for field in setting_fields():
        assert env_name(field.name) in text
        if field.name != "model":
            assert "--" + field.name.replace("_", "-") in text
    assert Settings().host == "127.0.0.1"


def test_module_entry_point_prints_help() -> None:
    out = subprocess.run([sys.executable, "-m", "oai_audio_server", "serve", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "OAS_MAX_AUDIO_SECONDS" in out.stdout


SNAPSHOT = Path(__file__).resolve().parents[1] / "snapshots" / "serve_help.txt"


def serve_help() -> str:
    out = subprocess.run([sys.executable, "-m", "oai_audio_server", "serve", "--help"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "100"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_help_matches_the_snapshot() -> None:
    """Regenerate after a deliberate change:
    COLUMNS=100 python3 -m oai_audio_server serve --help > tests/snapshots/serve_help.txt"""
    text = serve_help()
    assert text == SNAPSHOT.read_text()
    for group in ("model:", "server:", "limits:", "engine:", "security:"):
        assert f"\n{group}" in text
    words = " ".join(text.split())
    assert "(default: 48 MiB)" in words and "(default: 600 s = 10 min)" in words
    assert "50331648" not in words


def test_model_defaults_to_qwen_audio_chat_and_sizes_take_units() -> None:
    settings = settings_from_args(["serve", "--max-body-bytes", "16MiB"], environ={})
    assert settings.model == "Qwen/Qwen-Audio-Chat" and settings.hub == "auto"
    assert settings.max_body_bytes == 16 * 1024 * 1024
    env = {"OAS_MAX_AUDIO_BYTES": "512KiB", "OAS_HUB": "modelscope"}
    settings = settings_from_args(["serve"], environ=env)
    assert settings.max_audio_bytes == 512 * 1024 and settings.hub == "modelscope"
    assert settings_from_args(["serve", "--max-audio-bytes", "1000"], environ={}
                              ).max_audio_bytes == 1000
    with pytest.raises(SystemExit):
        settings_from_args(["serve", "--max-audio-bytes", "lots"], environ={})
    with pytest.raises(SystemExit):
        settings_from_args(["serve", "--hub", "github"], environ={})


def test_no_placeholder_is_a_raw_setting_name() -> None:
    """--gpu-memory-fraction FRACTION, not GPU_MEMORY_FRACTION: argparse's fallback."""
    serve = build_parser({})._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    for action in serve._actions:
        if action.option_strings and action.nargs != 0 and not action.choices:
            assert action.metavar, f"{action.dest} would show {action.dest.upper()}"
    assert "--gpu-memory-fraction FRACTION" in " ".join(serve.format_usage().split())


def test_serve_ray_takes_the_same_server_options() -> None:
    """serve-ray builds its parser without importing the CLI (flags.py is below both)."""
    import oai_audio_server.serve_ray.command as command

    parser, commands = command.root_parser()
    command.add_parser(commands, command.add_serve_parser(commands, {}), {})
    args = parser.parse_args(["serve-ray", "m", "--max-batch-size", "4", "--replicas", "2"])
    assert args.max_batch_size == 4 and args.replicas == 2

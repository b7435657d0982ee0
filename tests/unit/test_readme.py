"""README stays true to the code: every setting documented, the test command in CI."""

from __future__ import annotations

from pathlib import Path

from oai_audio_server.settings import env_name, setting_fields

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_table() -> None:
    for field in setting_fields():
        assert f"`{env_name(field.name)}`" in README
        if field.name != "model":
            assert "`--" + field.name.replace("_", "-") + "`" in README


def test_ci_runs_the_readme_test_command() -> None:
    assert "\npython3 -m pytest\n" in README
    assert "\npython3 -m pytest\n" in (ROOT / ".ci" / "run").read_text()

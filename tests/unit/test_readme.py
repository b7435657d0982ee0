"""README and docs stay true to the code: every setting in the table, every command
either run by a test or CI or saying why not, every link to a file that exists."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from doc_blocks import COMMAND_LANGUAGES, blocks, doc_files, runnable  # noqa: E402
from settings_table import settings_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()
RUNNERS = {"quickstart": "tests/test_quickstart.py", "ci": ".ci/run"}


def test_settings_table_is_generated_from_the_settings() -> None:
    """Regenerate with: cd tests && python3 settings_table.py"""
    assert settings_table() in README


def test_ci_runs_the_readme_test_command() -> None:
    assert "\npython3 -m pytest\n" in README
    assert "\npython3 -m pytest\n" in CI


def test_every_command_block_is_run_or_says_why_not() -> None:
    for path in doc_files():
        for block in blocks(path):
            if block.language not in COMMAND_LANGUAGES:
                continue
            where = f"{path.name}: {block.body[:60]!r}"
            assert block.mark is not None, f"{where} has no <!-- run: --> or <!-- not run: -->"
            if block.mark == "run":
                assert block.note in RUNNERS, f"{where}: unknown runner {block.note!r}"
                assert block.note in (ROOT / RUNNERS[block.note]).read_text() or \
                    block.note == "ci", where
            else:
                assert len(block.note) > 15, f"{where}: say why it is not run"


def test_ci_blocks_are_what_ci_runs() -> None:
    for block in runnable("ci"):
        command = block.body.strip()
        assert command == "./.ci/run" or f"\n{command}\n" in CI, command


def test_quick_start_is_in_order_and_complete() -> None:
    commands = [b.body for b in runnable("quickstart")]
    assert "python3 -m venv" in commands[0]
    assert any("oai-audio-server serve" in c for c in commands)
    assert any(c.startswith("curl http://127.0.0.1:8000/v1/models") for c in commands)
    assert README.index("## Quick start") < README.index("## Talking to it") < \
        README.index("## Supported API") < README.index("## Settings") < \
        README.index("## Troubleshooting")


def test_torch_index_commands() -> None:
    for build in ("cpu", "cu128"):
        assert f"pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/{build}" \
            in README
    pin = re.search(r"torch==([\d.]+)", CI)
    assert pin and f"torch=={pin.group(1)}" in (ROOT / "Containerfile").read_text()


def test_relative_links_point_to_files() -> None:
    for path in doc_files():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), f"{path.name} links to missing {target}"


def test_readme_is_short_and_speaks_of_the_product_as_it_is() -> None:
    assert len(README.splitlines()) < 375
    for history in ("previous engine", "sse-starlette", "design card"):
        assert history not in README, f"{history!r} belongs in docs/, if anywhere"


def test_the_snippets_sample_ships_with_the_project() -> None:
    """Small, and named where the snippets open it (from the repository root)."""
    sample = ROOT / "examples" / "speech.mp3"
    assert sample.is_file() and sample.stat().st_size < 64 * 1024
    talking = [b.body for b in runnable("quickstart")][3:]
    assert "speech.wav" not in README
    assert sum("examples/speech.mp3" in body for body in talking) == 3
    assert "[`examples/speech.mp3`](examples/speech.mp3)" in README

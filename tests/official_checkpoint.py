"""Opt-in checks against the official QwenLM/Qwen-Audio code (OAS_QWEN_AUDIO_REPO).

Nothing of the official code is part of this project: its files are copied from the
checkout the variable names into a temporary directory, exactly as a user's downloaded
checkpoint holds them, and run by ``official_side.py`` in the interpreter named by
OAS_QWEN_AUDIO_PYTHON (one with transformers 4.32-4.53; default: this one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ENV = "OAS_QWEN_AUDIO_REPO"
PYTHON_ENV = "OAS_QWEN_AUDIO_PYTHON"
SIDE = Path(__file__).resolve().parent / "official_side.py"


def official_repo() -> Path | None:
    value = os.environ.get(REPO_ENV)
    return Path(value) if value else None


def official_python() -> str:
    return os.environ.get(PYTHON_ENV) or sys.executable


def _run(*args: str) -> str:
    done = subprocess.run([official_python(), str(SIDE), *args], capture_output=True,
                          text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"official side failed:\n{done.stderr[-4000:]}")
    return done.stdout


def build_official_checkpoint(repo: Path, target: Path) -> Path:
    _run("build", str(repo), str(target))
    return target


def official_chat(checkpoint: Path, jobs: list[dict[str, Any]], work: Path) -> list[dict]:
    jobs_file = work / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    return list(json.loads(_run("chat", str(checkpoint), str(jobs_file))))

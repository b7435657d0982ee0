"""Fenced code blocks of README.md and docs/*.md with the comment that precedes each:
``<!-- run: NAME -->`` (a test or .ci/run executes it) or ``<!-- not run: why -->``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND_LANGUAGES = {"bash", "sh", "shell", "console", "python", "py", "js", "yaml"}
_BLOCK = re.compile(
    r"(?:<!--\s*(?P<mark>run|not run):\s*(?P<note>.*?)\s*-->\s*\n)?"
    r"(?P<indent>[ \t]*)```(?P<lang>[\w-]*)\n(?P<body>.*?)\n(?P=indent)```",
    re.DOTALL,
)


@dataclass(frozen=True)
class Block:
    path: Path
    language: str
    body: str
    mark: str | None  # "run", "not run" or None
    note: str  # the runner's name, or why it is not run


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(path: Path) -> list[Block]:
    found = []
    for match in _BLOCK.finditer(path.read_text()):
        indent = match.group("indent")
        body = "\n".join(line.removeprefix(indent) for line in match.group("body").split("\n"))
        found.append(Block(path, match.group("lang"), body, match.group("mark"),
                           match.group("note") or ""))
    return found


def runnable(name: str) -> list[Block]:
    """The blocks marked ``run: NAME``, in document order."""
    return [b for path in doc_files() for b in blocks(path)
            if b.mark == "run" and b.note == name]

"""Where log records go: one stderr handler, as text or as JSON lines.

Below the HTTP layer and the engine, which both set logging up (the engine process is a
process of its own); neither imports the other for it.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ExplainedError(Exception):
    """An error whose message already says what failed and what to do. Whoever handles
    it reports that message (the CLI as its one line, /health, a replica's health check);
    a traceback of it on the way is logged at DEBUG only."""


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line; request fields are top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "request", None)
        if isinstance(fields, dict):
            body.update(fields)
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False, default=str)


class ExplainedAtDebug(logging.Filter):
    """Drops records that carry an ExplainedError's traceback unless the level is DEBUG:
    the error's own line is reported where it is handled, so the traceback (often 25
    lines of chained causes) would only bury it."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ExplainedError):
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def configure_logging(json_lines: bool, level: int | str = logging.INFO) -> None:
    """Route every log record (uvicorn's included) through one stderr handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(ExplainedAtDebug())
    if isinstance(level, str):
        level = int(getattr(logging, level.upper()))  # "debug" -> logging.DEBUG
    logging.basicConfig(level=level, handlers=[handler], force=True)

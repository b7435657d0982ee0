"""``oai-audio-server serve MODEL [options]``; every option also reads ``OAS_<NAME>``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from oai_audio_server import __version__
from oai_audio_server.settings import Settings, env_name, setting_fields

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> int; ``tuple[str, ...]`` -> tuple."""
    hint = annotation
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _convert(kind: Any, raw: str, name: str) -> Any:
    if kind is bool:
        value = raw.strip().lower()
        if value not in _TRUE | _FALSE:
            raise ValueError(f"{name} must be true or false, not {raw!r}")
        return value in _TRUE
    if kind is tuple:
        return _comma_list(raw)
    return kind(raw)


def _comma_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(Settings)
    parser = argparse.ArgumentParser(
        prog="oai-audio-server",
        description="OpenAI-compatible server for Qwen-Audio-Chat: chat completions with "
        "audio input (JSON and streaming), models and health endpoints.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="load a checkpoint and serve it",
        description="Load MODEL and serve it. Every option can also be set with the "
        "environment variable shown in brackets; a flag wins over the variable.",
    )
    for field in setting_fields():
        kind = _base_type(hints[field.name])
        env = env_name(field.name)
        help_text = f"{field.metadata['help']} [{env}]"
        if field.name == "model":
            serve.add_argument(
                "model",
                nargs="?" if env in environ else None,
                default=environ.get(env),
                help=f"{help_text}",
            )
            continue
        default = field.default
        if env in environ:
            default = _convert(kind, environ[env], env)
        flag = "--" + field.name.replace("_", "-")
        if kind is bool:
            serve.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif kind is tuple:
            serve.add_argument(
                flag,
                type=_comma_list,
                default=default,
                metavar="A,B",
                help=help_text,
            )
        else:
            serve.add_argument(
                flag,
                type=kind,
                default=default,
                choices=field.metadata.get("choices"),
                help=help_text + (f" (default: {default})" if default not in (None, ()) else ""),
            )
    return parser


def settings_from_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    args = build_parser(environ).parse_args(list(argv))
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}
    return Settings(**values)


def serve(settings: Settings) -> None:
    import uvicorn

    from oai_audio_server.http.app import create_app
    from oai_audio_server.runtime import create_runtime
    from oai_audio_server.serving import GracefulServer, graceful_timeout

    # uvicorn re-raises SIGTERM/SIGINT once its graceful shutdown is done, so that the
    # previous handler runs; make that handler a clean exit (status 0), which also covers
    # a signal that arrives before uvicorn has installed its own handlers.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    runtime = create_runtime(settings)
    config = uvicorn.Config(
        create_app(runtime),
        host=settings.host,
        port=settings.port,
        # A backstop only: the drain ends every reply at --shutdown-timeout.
        timeout_graceful_shutdown=graceful_timeout(settings.shutdown_timeout),
        log_level="info",
        log_config=None,  # keep our handlers (text or JSON lines) for uvicorn's loggers
        access_log=False,  # the request log writes one richer line per request
    )
    server = GracefulServer(config, runtime, settings.shutdown_timeout)
    code: int | str | None = 1
    try:
        server.run()
        code = server.exit_code  # 1 when the engine died: the supervisor restarts us
    except SystemExit as stop:  # SIGTERM/SIGINT, re-raised by uvicorn once drained
        code = stop.code
    finally:
        _exit_now(code)


def _exit_now(code: int | str | None) -> None:
    """Everything was closed above (replies, engine, pools); Python's own teardown of
    torch and transformers would take seconds more of an orchestrator's grace period."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else 1 if code else 0)


def _exit_cleanly(signum: int, frame: types.FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> None:
    from oai_audio_server.http.request_log import configure_logging

    settings = settings_from_args(sys.argv[1:] if argv is None else argv)
    configure_logging(json_lines=settings.log_json)
    serve(settings)


if __name__ == "__main__":
    main()

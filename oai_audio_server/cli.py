"""``oai-audio-server serve [MODEL] [options]``; every option also reads ``OAS_<NAME>``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from oai_audio_server import __version__
from oai_audio_server.hub import HubError, resolve
from oai_audio_server.serve_ray import command as serve_ray_command
from oai_audio_server.settings import GROUPS, Settings, env_name, setting_fields
from oai_audio_server.units import format_value, parse_bytes

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> int; ``tuple[str, ...]`` -> tuple."""
    hint = annotation
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _convert(kind: Any, raw: str, name: str, unit: str = "") -> Any:
    if unit == "bytes":
        return parse_bytes(raw)
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
        description="OpenAI-compatible server for Qwen-Audio-Chat and Qwen2-Audio: chat "
        "completions with audio input (JSON and streaming), transcriptions, models and "
        "health endpoints.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="load a checkpoint and serve it",
        description="Load MODEL (default: the Qwen-Audio-Chat model from the hub) and serve "
        "it. Every option can also be set with the environment variable shown in brackets; "
        "a flag wins over the variable. Sizes take KiB, MiB or GiB (48MiB).",
    )
    groups = {name: serve.add_argument_group(title) for name, title in GROUPS.items()}
    for field in setting_fields():
        _add_setting(groups[field.metadata["group"]], field, hints[field.name], environ)
    serve_ray_command.add_parser(commands, serve, environ)
    return parser


def _add_setting(
    group: argparse._ArgumentGroup,
    field: dataclasses.Field[Any],
    hint: Any,
    environ: Mapping[str, str],
) -> None:
    kind = _base_type(hint)
    unit = field.metadata["unit"]
    env = env_name(field.name)
    default = field.default
    if env in environ:
        default = _convert(kind, environ[env], env, unit)
    shown = f" (default: {format_value(default, unit)})" if default not in (None, ()) else ""
    help_text = f"{field.metadata['help']}{shown} [{env}]"
    if field.name == "model":
        group.add_argument("model", nargs="?", default=default, help=help_text)
    elif kind is bool:
        group.add_argument(
            _flag(field.name), action=argparse.BooleanOptionalAction, default=default,
            help=f"{field.metadata['help']} (default: {format_value(default, unit)}) [{env}]",
        )
    elif kind is tuple:
        group.add_argument(
            _flag(field.name), type=_comma_list, default=default, metavar="A,B", help=help_text
        )
    else:
        group.add_argument(
            _flag(field.name),
            type=_parser_for(kind, unit),
            default=default,
            choices=field.metadata.get("choices"),
            metavar=field.metadata.get("metavar") or _METAVARS.get(unit or kind.__name__),
            help=help_text,
        )


_METAVARS = {"bytes": "SIZE", "s": "SECONDS", "ms": "MS", "int": "N"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parser_for(kind: Any, unit: str) -> Callable[[str], Any]:
    if unit == "bytes":
        return _size
    return cast(Callable[[str], Any], kind)


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == serve_ray_command.COMMAND:
        serve_ray_command.main(argv)
        return
    settings = settings_from_args(argv)
    configure_logging(json_lines=settings.log_json)
    try:
        settings = with_local_model(settings)
    except (HubError, FileNotFoundError) as error:
        sys.exit(f"oai-audio-server: error: {error}")
    serve(settings)


def with_local_model(settings: Settings) -> Settings:
    """Download a hub id before the server starts (so a failure is one line and exit
    status 1); clients keep sending the id as the model name."""
    if Path(settings.model).expanduser().is_dir():
        return settings
    model_dir = resolve(settings.model, settings.hub, settings.download_dir)
    return settings.replace(
        model=str(model_dir), served_model_name=settings.served_model_name or settings.model
    )


if __name__ == "__main__":
    main()

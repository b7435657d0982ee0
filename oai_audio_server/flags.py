"""Settings <-> command-line flags: the ``serve`` options, each also read from ``OAS_<NAME>``.

Below both ``cli.py`` (which runs ``serve``) and ``serve_ray/`` (whose subcommand copies
these options and whose replicas parse their ``args`` with them), so neither has to
import the other for the mapping.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from oai_audio_server import __version__
from oai_audio_server.settings import GROUPS, Settings, env_name, setting_fields
from oai_audio_server.units import format_value, parse_bytes

SERVE = "serve"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
# Placeholders in --help for values without a metavar of their own: never the raw
# setting name (GPU_MEMORY_FRACTION) that argparse would show.
_METAVARS = {"bytes": "SIZE", "s": "SECONDS", "ms": "MS", "int": "N", "float": "X",
             "str": "TEXT"}


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def root_parser() -> tuple[argparse.ArgumentParser, Any]:
    """``oai-audio-server`` with its subcommand slot (the parser and its subparsers)."""
    parser = argparse.ArgumentParser(
        prog="oai-audio-server",
        description="OpenAI-compatible server for Qwen-Audio-Chat and Qwen2-Audio: chat "
        "completions with audio input (JSON and streaming), transcriptions, models and "
        "health endpoints.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    return parser, parser.add_subparsers(dest="command", required=True)


def add_serve_parser(commands: Any, environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The ``serve`` subcommand: one option per setting, in its --help group."""
    hints = typing.get_type_hints(Settings)
    serve = commands.add_parser(
        SERVE,
        help="load a checkpoint and serve it",
        description="Load MODEL (default: the Qwen-Audio-Chat model from the hub) and serve "
        "it. Every option can also be set with the environment variable shown in brackets; "
        "a flag wins over the variable. Sizes take KiB, MiB or GiB (48MiB).",
    )
    groups = {name: serve.add_argument_group(title) for name, title in GROUPS.items()}
    for field in setting_fields():
        _add_setting(groups[field.metadata["group"]], field, hints[field.name], environ)
    return cast(argparse.ArgumentParser, serve)


def settings_from_namespace(args: argparse.Namespace) -> Settings:
    return Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})


def settings_from_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    """``["serve", MODEL, --flag, ...]`` -> Settings (argparse exits on a bad value)."""
    import os

    parser, commands = root_parser()
    add_serve_parser(commands, os.environ if environ is None else environ)
    return settings_from_namespace(parser.parse_args(list(argv)))


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
            flag_name(field.name), action=argparse.BooleanOptionalAction, default=default,
            help=f"{field.metadata['help']} (default: {format_value(default, unit)}) [{env}]",
        )
    elif kind is tuple:
        group.add_argument(
            flag_name(field.name), type=_comma_list, default=default, metavar="A,B",
            help=help_text,
        )
    else:
        choices = field.metadata.get("choices")
        group.add_argument(
            flag_name(field.name),
            type=_parser_for(kind, unit),
            default=default,
            choices=choices,
            # With choices argparse shows them ({auto,cpu}), which says more than a name.
            metavar=field.metadata.get("metavar") or (
                None if choices else _METAVARS[unit or kind.__name__]),
            help=help_text,
        )


def _parser_for(kind: Any, unit: str) -> Callable[[str], Any]:
    if unit == "bytes":
        return _size
    return cast(Callable[[str], Any], kind)


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None

"""Settings <-> the ``args`` of the Serve application (the config file's ``args:``).

``args`` hold the server's options by their setting names (``max_batch_size: 4``). A
replica turns them back into Settings with the same parser as ``oai-audio-server serve``
(types, choices and ``OAS_*`` variables of the replica's environment included), so a
replica is configured exactly as a plain server with the same flags would be.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from typing import Any

from oai_audio_server.flags import flag_name, settings_from_args
from oai_audio_server.settings import Settings, setting_fields

# Where the replica listens is Serve's business (http_options), and a key in the config
# file would be readable by anyone who can read the cluster's config: a replica takes
# OAS_API_KEY from its environment instead.
NOT_IN_ARGS = frozenset({"host", "port", "api_key"})


def app_args(settings: Settings) -> dict[str, Any]:
    """The model and every setting that differs from its default, YAML-friendly."""
    args: dict[str, Any] = {"model": settings.model}
    for field in setting_fields():
        if field.name in NOT_IN_ARGS or field.name == "model":
            continue
        value = getattr(settings, field.name)
        if value == field.default:
            continue
        args[field.name] = list(value) if isinstance(value, tuple) else value
    return args


def settings_from_app_args(
    args: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> Settings:
    """Raise ValueError for an unknown name or a value the CLI would refuse."""
    known = {field.name for field in setting_fields()} - NOT_IN_ARGS
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown server options in args: {', '.join(unknown)}")
    argv = ["serve"]
    if args.get("model"):
        argv.append(str(args["model"]))
    for name, value in args.items():
        if name != "model":
            argv.extend(_flag(name, value))
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return settings_from_args(argv, environ)
    except SystemExit:  # argparse's way of refusing a value
        raise ValueError(f"invalid server options in args: {errors.getvalue().strip()}") from None


def _flag(name: str, value: Any) -> list[str]:
    flag = flag_name(name)
    if value is None:
        return []
    if isinstance(value, bool):
        return [flag if value else "--no-" + name.replace("_", "-")]
    if isinstance(value, list | tuple):
        return [flag, ",".join(str(item) for item in value)]
    return [flag, str(value)]

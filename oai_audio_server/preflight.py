"""What ``serve`` checks before the engine starts (and before any download), so that a
wrong setting ends the process at once with one line saying what to do, instead of a
server that starts, loads for minutes and then fails.

Each check raises :class:`StartError`; ``cli.main`` prints its message and exits 1.
"""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path

from oai_audio_server.settings import Settings


class StartError(Exception):
    """A setting that cannot work: the message names it and what to pass instead."""


def check_flags(settings: Settings) -> None:
    """Values argparse's types let through but the server cannot use."""
    if not 0 <= settings.port <= 65535:
        raise StartError(f"--port {settings.port} is not a port; use 1-65535 (e.g. 8000)")
    if not 0 < settings.gpu_memory_fraction <= 1:
        raise StartError(f"--gpu-memory-fraction {settings.gpu_memory_fraction:g} is not a "
                         "share of the GPU's memory; use a number above 0 and at most 1 "
                         "(default 0.9)")
    media = settings.allowed_local_media_path
    if media is not None and not Path(media).expanduser().is_dir():
        raise StartError(f"--allowed-local-media-path {media} is not a directory; name an "
                         "existing directory, or leave it unset")


def check_device(settings: Settings) -> str:
    """``--device`` as the engine will use it (``cuda`` -> ``cuda:0``)."""
    from oai_audio_server.engine.loader import pick_device

    try:
        return str(pick_device(settings.device))
    except ValueError as error:
        raise StartError(str(error)) from None


def bind_port(host: str, port: int) -> socket.socket:
    """The server's socket, bound now and listened on once the app starts: a taken port
    is found before a download of many GB, and nothing else can take it meanwhile."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise StartError(f"port {port} on {host} is already in use by another process; "
                             f"stop it, or pass another port: --port {port + 1}") from None
        if error.errno == errno.EACCES:
            raise StartError(f"no permission to listen on port {port} (ports below 1024 need "
                             "privileges); pass a higher one: --port 8000") from None
        raise StartError(f"cannot listen on {host}:{port} ({error.strerror or error}); check "
                         "--host (an address of this machine, 127.0.0.1 or 0.0.0.0)") from None
    sock.set_inheritable(False)
    return sock


def check_checkpoint(model_dir: Path) -> None:
    """A checkpoint directory has a config.json of a family this server runs and its
    weight files: the cheap part of a load, before the engine reads gigabytes."""
    from oai_audio_server.models.checkpoint import UnsupportedCheckpointError, weight_files
    from oai_audio_server.models.registry import detect_family

    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise StartError(f"{model_dir} has no config.json, so it is not a checkpoint "
                         "directory; pass the directory that holds config.json and the "
                         "weights, or a hub id such as Qwen/Qwen-Audio-Chat")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StartError(f"{config_path} cannot be read as JSON ({error}); the checkpoint "
                         "is incomplete or damaged: download it again") from None
    if not isinstance(config, dict):
        raise StartError(f"{config_path} is not a JSON object; the checkpoint is damaged: "
                         "download it again")
    try:
        detect_family(config)
        weight_files(model_dir)
    except (UnsupportedCheckpointError, FileNotFoundError, KeyError, ValueError) as error:
        raise StartError(str(error).strip().splitlines()[0]) from None

"""``oai-audio-server serve [MODEL] [options]``; every option also reads ``OAS_<NAME>``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path

from oai_audio_server.flags import add_serve_parser, root_parser, settings_from_args
from oai_audio_server.hub import HubError, resolve
from oai_audio_server.preflight import (
    StartError,
    bind_port,
    check_checkpoint,
    check_device,
    check_flags,
)
from oai_audio_server.serve_ray import command as serve_ray_command
from oai_audio_server.settings import Settings

__all__ = ["build_parser", "main", "settings_from_args"]


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """Every subcommand: ``serve`` and ``serve-ray`` (which copies serve's options)."""
    environ = os.environ if environ is None else environ
    parser, commands = root_parser()
    serve_ray_command.add_parser(commands, add_serve_parser(commands, environ), environ)
    return parser


def serve(settings: Settings, sock: socket.socket | None = None) -> None:
    """Serve until SIGTERM/SIGINT (exit 0), an engine crash or a failed load (exit 1);
    ``sock`` is the bound socket from the start-up checks (else one is bound here)."""
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
        log_level=settings.log_level,
        log_config=None,  # keep our handlers (text or JSON lines) for uvicorn's loggers
        access_log=False,  # the request log writes one richer line per request
    )
    server = GracefulServer(config, runtime, settings.shutdown_timeout)
    code: int | str | None = 1
    try:
        server.run(sockets=[sock or bind_port(settings.host, settings.port)])
        code = server.exit_code  # 1 when the engine died: the supervisor restarts us
    except SystemExit as stop:  # SIGTERM/SIGINT, re-raised by uvicorn once drained
        code = stop.code
    finally:
        if runtime.lifecycle.load_failure is not None:
            print(f"oai-audio-server: error: the model failed to load: "
                  f"{runtime.lifecycle.load_failure}", file=sys.stderr)
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
    from oai_audio_server.logging_setup import configure_logging

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == serve_ray_command.COMMAND:
        serve_ray_command.main(argv)
        return
    settings = settings_from_args(argv)
    configure_logging(json_lines=settings.log_json, level=settings.log_level)
    try:
        sock = checked_start(settings)
        settings = with_local_model(settings)
        check_checkpoint(Path(settings.model).expanduser())
    except (StartError, HubError, FileNotFoundError) as error:
        sys.exit(f"oai-audio-server: error: {error}")
    serve(settings, sock)


def checked_start(settings: Settings) -> socket.socket:
    """Everything that can be checked before a download or the engine: the flags, the
    device, the port (bound here, kept for the server) and a local checkpoint."""
    check_flags(settings)
    check_device(settings)
    sock = bind_port(settings.host, settings.port)
    model = Path(settings.model).expanduser()
    if model.is_dir():
        try:
            check_checkpoint(model)
        except StartError:
            sock.close()
            raise
    return sock


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

"""Container health check: GET /health on the port the running server actually uses.

The port comes from the server's own command line and environment, parsed by the same
parser as ``serve`` (so ``--port`` given as an argument and ``OAS_PORT`` both count).
Exit status 0 when /health answers 200, else 1.

    python -m oai_audio_server.healthcheck
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from oai_audio_server.flags import settings_from_args

TIMEOUT_SECONDS = 4.0
_ANY_ADDRESS = {"0.0.0.0", "::", ""}


def serve_arguments(argv: Sequence[str]) -> list[str] | None:
    """``[...]`` from a command line ``... oai-audio-server serve [...]``; None otherwise."""
    for index, word in enumerate(argv[:-1]):
        if word.endswith(("oai-audio-server", "oai_audio_server")) and argv[index + 1] == "serve":
            return list(argv[index + 1:])
    return None


def _read_process(proc: Path) -> tuple[list[str], dict[str, str]] | None:
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        env_bytes = (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    environ = dict(item.decode(errors="replace").split("=", 1)
                   for item in env_bytes if b"=" in item)
    return [a.decode(errors="replace") for a in argv if a], environ


def find_server(processes: Iterable[Path]) -> tuple[list[str], dict[str, str]] | None:
    """The arguments and environment of the first ``serve`` process found."""
    for proc in processes:
        found = _read_process(proc)
        if found is not None and (args := serve_arguments(found[0])) is not None:
            return args, found[1]
    return None


def health_url(args: Sequence[str], environ: Mapping[str, str]) -> str:
    settings = settings_from_args(args, environ)
    host = "127.0.0.1" if settings.host in _ANY_ADDRESS else settings.host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}/health"


def check(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def main() -> None:
    proc = Path("/proc")
    candidates = [proc / "1", *sorted(proc.glob("[0-9]*"), key=lambda p: int(p.name))]
    server = find_server(candidates)
    if server is None:
        print("healthcheck: no 'oai-audio-server serve' process found", file=sys.stderr)
        sys.exit(1)
    url = health_url(*server)
    healthy = check(url)
    print(f"healthcheck: {url} {'ok' if healthy else 'not ready'}")
    sys.exit(0 if healthy else 1)


if __name__ == "__main__":
    main()

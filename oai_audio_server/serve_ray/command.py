"""``oai-audio-server serve-ray MODEL [server options] [replica options]``.

Builds the Serve config for the options (see ``config``) and either prints it
(``--print-config``: for ``serve run FILE``, ``serve deploy`` or KubeRay) or deploys it
to a Ray cluster the way ``serve run FILE`` does, which is what it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from oai_audio_server.flags import add_serve_parser, root_parser, settings_from_namespace
from oai_audio_server.serve_ray.config import serve_config
from oai_audio_server.serve_ray.options import ReplicaOptions
from oai_audio_server.settings import env_name

COMMAND = "serve-ray"

_REPLICA_FLAGS: list[tuple[str, type, str]] = [
    ("replicas", int, "Replicas to run when not autoscaling."),
    ("min_replicas", int, "Autoscale: fewest replicas (setting this or --max-replicas turns "
     "autoscaling on; default 1)."),
    ("max_replicas", int, "Autoscale: most replicas (default: --min-replicas)."),
    ("target_ongoing_requests", float, "Autoscale: requests per replica (running and waiting) "
     "Serve aims for; above it, it adds replicas (default: --max-batch-size)."),
    ("max_ongoing_requests", int, "Most requests Serve sends one replica at once; the rest wait "
     "in Serve (default: 2 x --max-batch-size, at most --max-batch-size + --max-queue)."),
    ("max_queued_requests", int, "Most requests waiting in Serve's router (per proxy) for a "
     "replica; more get 503 (default: --max-queue; -1 = no limit)."),
    ("upscale_delay_s", float, "Autoscale: seconds of load above target before adding a "
     "replica (Serve's default: 30)."),
    ("downscale_delay_s", float, "Autoscale: seconds of load below target before removing one "
     "(Serve's default: 600)."),
    ("num_gpus", float, "GPUs per replica; 0 for CPU replicas."),
    ("num_cpus", float, "CPUs per replica (Ray's scheduling; a CPU replica computes with "
     "this many threads unless --cpu-threads says otherwise)."),
    ("health_check_period_s", float, "Seconds between Serve's health checks of a replica."),
    ("health_check_timeout_s", float, "Seconds a health check may take."),
]


def add_parser(
    commands: Any, serve_parser: argparse.ArgumentParser, environ: Mapping[str, str]
) -> None:
    """The subcommand: every option of ``serve`` (copied from its parser) plus the
    replica and Ray options; ``environ`` gives the OAS_* and RAY_ADDRESS defaults."""
    parser = commands.add_parser(
        COMMAND,
        parents=[serve_parser],
        conflict_handler="resolve",  # the parent's -h/--help
        help="serve replicas of the server on a Ray cluster (needs the [ray] extra)",
        description="Deploy the server as a Ray Serve application: each replica loads "
        "MODEL and runs the whole server; Serve's HTTP proxy listens on --host/--port. "
        "Replica options also read OAS_<NAME>.",
    )
    group = parser.add_argument_group("replicas (Ray Serve)")
    defaults = ReplicaOptions()
    for name, kind, help_text in _REPLICA_FLAGS:
        default = getattr(defaults, name)
        env = env_name(name)
        if env in environ:
            default = kind(environ[env])
        shown = "" if default is None else f" (default: {default})"
        group.add_argument(
            "--" + name.replace("_", "-"), type=kind, default=default,
            help=f"{help_text} [{env}]{shown}",
        )
    ray = parser.add_argument_group("Ray")
    ray.add_argument(
        "--ray-address", default=environ.get("RAY_ADDRESS"),
        help="Ray cluster to deploy to (e.g. 127.0.0.1:6379 or auto); default: a running "
        "local one, else a new one in this process [RAY_ADDRESS]",
    )
    ray.add_argument(
        "--print-config", action="store_true",
        help="print the Serve config (YAML) and exit, deploying nothing",
    )
    ray.add_argument(
        "--non-blocking", action="store_true",
        help="return once the config is submitted, leaving the application running",
    )


def options_from_namespace(args: argparse.Namespace) -> ReplicaOptions:
    values = {name: getattr(args, name) for name, _, _ in _REPLICA_FLAGS}
    options = ReplicaOptions(**values)
    options.check()
    return options


def to_yaml(config: dict[str, Any]) -> str:
    import yaml

    text: str = yaml.safe_dump(config, sort_keys=False)
    return text


def run(args: argparse.Namespace) -> None:
    settings = settings_from_namespace(args)
    try:
        options = options_from_namespace(args)
    except ValueError as exc:
        sys.exit(f"oai-audio-server {COMMAND}: {exc}")
    config = serve_config(settings, options)
    if args.print_config:
        sys.stdout.write(to_yaml(config))
        return
    if settings.api_key:
        # Not in args (the printed config is for sharing): the replicas' environment.
        config["applications"][0]["runtime_env"] = {
            "env_vars": {env_name("api_key"): settings.api_key}
        }
    deploy(config, args.ray_address, blocking=not args.non_blocking)


def deploy(config: dict[str, Any], address: str | None, *, blocking: bool) -> None:
    """``serve run FILE [--address A] [--non-blocking]``, in this process."""
    try:
        from ray.serve.scripts import cli
    except ImportError:
        sys.exit(f"oai-audio-server {COMMAND} needs Ray Serve: pip install 'oai-audio-server[ray]'")
    with tempfile.TemporaryDirectory(prefix="oas-serve-") as folder:
        path = Path(folder) / "serve-config.yaml"
        path.write_text(to_yaml(config))
        argv = ["run", str(path)]
        if address:
            argv += ["--address", address]
        if not blocking:
            argv.append("--non-blocking")
        cli.main(args=argv, prog_name="serve", standalone_mode=True)


def main(argv: Sequence[str]) -> None:
    parser, commands = root_parser()
    add_parser(commands, add_serve_parser(commands, os.environ), os.environ)
    run(parser.parse_args(list(argv)))

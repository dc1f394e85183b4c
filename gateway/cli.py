"""The ``sandman`` command: ``serve`` runs the gateway, ``gpus --probe`` prints what NVML sees,
``health`` checks a running gateway, and every other command is the API client
(:mod:`gateway.client`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

from aiohttp import web

from gateway.client.commands import Io, login
from gateway.client.http import Api, ApiError
from gateway.client.parser import COMMAND, add_client_commands
from gateway.client.settings import Settings, SettingsError, resolve
from gateway.config import Config, EnvError, config_from_args, parse
from gateway.errors import GatewayError


def _node(args: argparse.Namespace, io: Io) -> int:
    """``sandman node``: print (or ``--write`` into a daemon.json) this machine's GPU slices
    as node generic resources."""
    import tempfile
    from pathlib import Path

    from gateway.core.node_slices import node_generic_resources, with_node_resources
    from gateway.gpu import open_backend

    async def read() -> list[str]:
        with tempfile.TemporaryDirectory() as state:
            backend = await open_backend(args.gpus, state_dir=Path(state))
            try:
                return node_generic_resources(await backend.inventory())
            finally:
                await backend.close()

    try:
        offered = asyncio.run(read())
        path = Path(args.write) if args.write else None
        daemon = json.loads(path.read_text()) if path and path.exists() else {}
        merged = with_node_resources(daemon, offered)
        if path is not None:
            path.write_text(json.dumps(merged, indent=2) + "\n")
    except (GatewayError, OSError, ValueError) as exc:
        io.err.write(f"sandman node: {getattr(exc, 'log_message', None) or exc}\n")
        return 1
    io.out.write(json.dumps(with_node_resources({}, offered), indent=2) + "\n")
    return 0


def main(
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    inp: TextIO | None = None,
) -> int:
    """Run one ``sandman`` command; the exit status is 0, 1 (the API or the system refused)
    or 2 (bad usage or no settings)."""
    env = os.environ if env is None else env
    io = Io(out=out or sys.stdout, err=err or sys.stderr, env=env, inp=inp or sys.stdin)
    try:
        args = parse(argv, env, add_client_commands)
    except EnvError as exc:  # a command line error exits through argparse, also with 2
        io.err.write(f"sandman: {exc}\n")
        return 2
    if args.command == "serve":
        return _serve(args, env, io)
    if args.command == "health":
        from gateway.health import check, health_url

        healthy, detail = check(health_url(args.url, args.host, args.port, env))
        (io.out if healthy else io.err).write(detail + "\n")
        return 0 if healthy else 1
    if args.command == "node":
        return _node(args, io)
    if args.command == "gpus" and args.probe:
        from gateway.gpu.nvml import probe
        from gateway.runtime.docker import probe_gpu_path

        report = asyncio.run(probe())
        report["docker"] = asyncio.run(probe_gpu_path())
        io.out.write(json.dumps(report, indent=2) + "\n")
        return 0
    try:
        if args.command == "login":
            return asyncio.run(login(args, io))
        settings = resolve(args.url, args.token, env)
        return asyncio.run(_client(settings, args, io))
    except SettingsError as exc:
        io.err.write(f"sandman: {exc}\n")
        return 2
    except ApiError as exc:
        code = f" ({exc.code})" if exc.code else ""
        io.err.write(f"sandman: {exc.message}{code}\n")
        return 1
    except KeyboardInterrupt:
        return 130


async def _client(settings: Settings, args: argparse.Namespace, io: Io) -> int:
    async with Api(settings) as api:
        return await getattr(args, COMMAND)(api, args, io)


def configure_logging(level: str) -> None:
    """The gateway's log at ``level``. asyncssh logs every connection it opens at INFO (each
    readiness probe and control-channel call): its lines show only at DEBUG."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


def _serve(args: argparse.Namespace, env: Mapping[str, str], io: Io) -> int:
    try:
        config = config_from_args(args, env)
    except ValueError as exc:
        io.err.write(f"sandman: {exc}\n")
        return 2
    configure_logging(config.log_level)
    from gateway.api import create_app
    from gateway.api.app import run_settings
    from gateway.fdlimit import raise_fd_limit

    raise_fd_limit()

    try:
        web.run_app(
            create_app(config),
            host=config.host,
            port=config.port,
            print=lambda _: _log_serving(config),
            **run_settings(config),
        )
    except GatewayError as exc:  # start-up refused (GPU host misconfigured, no Docker, ...)
        io.err.write(f"sandman: {exc.log_message}\n")
        return 1
    logging.getLogger(__name__).info("stopped: API and session ports closed")
    return 0


def _log_serving(config: Config) -> None:
    """Tell the operator, once the API is up, where it is and where its token comes from."""
    token = "SANDMAN_API_TOKEN" if config.api_token else str(config.token_path)
    logging.getLogger(__name__).info(
        "serving: API http://%s:%d (bearer token: %s), session SSH ports %d-%d on %s",
        config.host,
        config.port,
        token,
        config.ssh_ports.start,
        config.ssh_ports.end,
        config.ssh_bind,
    )

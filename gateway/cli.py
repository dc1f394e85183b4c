"""The ``sandman`` command: ``serve`` runs the gateway, ``gpus --probe`` prints what NVML sees,
and every other command is the API client (:mod:`gateway.client`)."""

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
from gateway.config import config_from_args, parse
from gateway.errors import GatewayError


def main(
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run one ``sandman`` command; the exit status is 0, 1 (the API or the system refused)
    or 2 (bad usage or no settings)."""
    env = os.environ if env is None else env
    io = Io(out=out or sys.stdout, err=err or sys.stderr, env=env)
    args = parse(argv, env, add_client_commands)
    if args.command == "serve":
        return _serve(args, env, io)
    if args.command == "gpus" and args.probe:
        from gateway.gpu.nvml import probe

        io.out.write(json.dumps(asyncio.run(probe()), indent=2) + "\n")
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


def _serve(args: argparse.Namespace, env: Mapping[str, str], io: Io) -> int:
    try:
        config = config_from_args(args, env)
    except ValueError as exc:
        io.err.write(f"sandman: {exc}\n")
        return 2
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from gateway.api import create_app

    try:
        web.run_app(create_app(config), host=config.host, port=config.port, print=None)
    except GatewayError as exc:  # start-up refused (GPU host misconfigured, no Docker, ...)
        print(f"sandman: {exc.log_message}", file=sys.stderr)
        return 1
    return 0

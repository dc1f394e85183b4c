"""The ``sandman`` command: ``serve`` runs the gateway; ``gpus --probe`` prints what NVML sees."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence

from aiohttp import web

from gateway.config import config_from_args, parse
from gateway.errors import GatewayError


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.command == "gpus":
        if not args.probe:
            print("sandman gpus: give --probe (a read-only NVML probe)", file=sys.stderr)
            return 2
        from gateway.gpu.nvml import probe

        print(json.dumps(asyncio.run(probe()), indent=2))
        return 0
    try:
        config = config_from_args(args, os.environ)
    except ValueError as exc:
        print(f"sandman: {exc}", file=sys.stderr)
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

"""The ``sandman`` command: ``serve`` runs the gateway; ``gpus --probe`` prints what NVML sees;
``health`` checks a running gateway."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence

from aiohttp import web

from gateway.config import Config, config_from_args, parse


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.command == "health":
        from gateway.health import check

        healthy, detail = check(args.host, args.port)
        print(detail, file=sys.stdout if healthy else sys.stderr)
        return 0 if healthy else 1
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

    web.run_app(
        create_app(config),
        host=config.host,
        port=config.port,
        print=lambda _: _log_serving(config),
    )
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

"""``sandman health``: the container healthcheck against a served app, a degraded one, none."""

from __future__ import annotations

import asyncio

from gateway.cli import main
from gateway.config import parse
from tests.e2e.conftest import free_tcp_port


async def test_health_exits_zero_only_while_the_gateway_answers_200(make_client, runtime, capsys):
    client = await make_client()
    port = str(client.server.port)
    assert await asyncio.to_thread(main, ["health", "--host", "0.0.0.0", "--port", port]) == 0
    assert '200 {"status": "healthy"' in capsys.readouterr().out

    runtime.reachable = False
    assert await asyncio.to_thread(main, ["health", "--host", "127.0.0.1", "--port", port]) == 1
    assert "503" in capsys.readouterr().err


def test_health_fails_with_the_reason_when_nothing_listens(capsys):
    assert main(["health", "--port", str(free_tcp_port())]) == 1
    assert "unreachable" in capsys.readouterr().err


def test_health_reads_the_serve_port_from_the_environment():
    args = parse(["health"], {"SANDMAN_PORT": "9123", "SANDMAN_HOST": "::"})
    assert (args.host, args.port) == ("::", 9123)

"""``sandman health``: the container healthcheck against a served app, a degraded one, none."""

from __future__ import annotations

import asyncio

import pytest

from gateway.cli import main
from gateway.client.settings import Settings, config_path, save
from gateway.config import parse
from gateway.health import health_url
from tests.net import free_tcp_port


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


async def test_health_follows_the_clients_saved_url(make_client, tmp_path, capsys):
    client = await make_client()
    url = f"http://127.0.0.1:{client.server.port}"
    env = {"HOME": str(tmp_path)}
    save(config_path(env), Settings(url=url, token="t"))  # as `sandman login` leaves it
    assert await asyncio.to_thread(main, ["health"], env=env) == 0
    assert '200 {"status": "healthy"' in capsys.readouterr().out
    env = {"HOME": str(tmp_path / "none"), "SANDMAN_URL": url}
    assert await asyncio.to_thread(main, ["health"], env=env) == 0


@pytest.mark.parametrize(
    ("url", "host", "port", "env", "expected"),
    [
        (None, None, None, {}, "http://127.0.0.1:8080"),
        (None, None, 9123, {}, "http://127.0.0.1:9123"),
        (None, "::", 9123, {}, "http://[::1]:9123"),
        (None, "10.0.0.5", None, {}, "http://10.0.0.5:8080"),
        (None, None, None, {"SANDMAN_URL": "https://gw.lab"}, "https://gw.lab"),
        (None, None, 9123, {"SANDMAN_URL": "https://gw.lab"}, "http://127.0.0.1:9123"),
        ("http://x:1", "h", 2, {"SANDMAN_URL": "https://gw.lab"}, "http://x:1"),
    ],
)
def test_which_gateway_health_asks(url, host, port, env, expected, tmp_path):
    assert health_url(url, host, port, {"HOME": str(tmp_path), **env}) == expected

"""The access log keeps INFO for what changes something or fails; the admin page's polling,
health checks and scrapes go to DEBUG."""

from __future__ import annotations

import logging

import aiohttp
import pytest

from gateway.api.access_log import routine
from tests.unit.conftest import TOKEN


@pytest.mark.parametrize(
    ("method", "status", "quiet"),
    [
        ("GET", 200, True),
        ("HEAD", 200, True),
        ("OPTIONS", 200, True),
        ("GET", 304, True),
        ("GET", 401, False),
        ("GET", 503, False),
        ("POST", 201, False),
        ("DELETE", 200, False),
        ("PATCH", 200, False),
    ],
)
def test_routine_requests(method, status, quiet):
    assert routine(method, status) is quiet


async def test_polling_is_logged_at_debug_and_changes_at_info(make_server, caplog):
    server = await make_server()
    caplog.set_level(logging.DEBUG, logger="aiohttp.access")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(str(server.make_url("")), headers=headers) as http:
        for path in ("/sessions", "/healthz", "/gpus/available"):
            async with http.get(path) as resp:
                assert resp.status == 200
        async with http.post("/sessions", json={"user_id": "root"}) as resp:
            assert resp.status == 400
    levels = {
        record.getMessage().split('"')[1]: record.levelname
        for record in caplog.records
        if record.name == "aiohttp.access"
    }
    assert levels == {
        "GET /sessions HTTP/1.1": "DEBUG",
        "GET /healthz HTTP/1.1": "DEBUG",
        "GET /gpus/available HTTP/1.1": "DEBUG",
        "POST /sessions HTTP/1.1": "INFO",
    }

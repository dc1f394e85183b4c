"""The expiry timer on a real clock: warnings run ``wall`` in the container at their offsets,
the session ends at its expiry, and a PATCH moves both."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from tests.unit.helpers import create


@pytest.fixture
def clock():
    return lambda: datetime.now(UTC)


async def ended(client, session_id: str) -> dict:
    """The session's end event, once the timer (a task of the gateway's) has written it."""
    async with asyncio.timeout(10):
        while True:
            events = (await (await client.get("/audit", params={"session_id": session_id})).json())[
                "events"
            ]
            if events[0]["event"] == "session_expired":
                return events[0]
            await asyncio.sleep(0.05)


async def test_warns_then_ends_at_the_patched_expiry(make_client, runtime):
    client = await make_client(expiry_warnings=(1.0,))
    body = await (await create(client, ttl_seconds=2)).json()
    patched = await client.patch(f"/sessions/{body['session_id']}", json={"ttl_seconds": 4})
    expires = datetime.fromisoformat((await patched.json())["expires_at"].replace("Z", "+00:00"))

    end = await ended(client, body["session_id"])
    assert datetime.fromisoformat(end["at"].replace("Z", "+00:00")) >= expires
    assert end["reason"] == "ttl_expired"
    # one warning, a second before the new expiry (the old one's never came), as root:tty
    ((container_id, argv, user),) = runtime.execs
    assert container_id == body["container_id"] and user == "0:5"
    assert argv[0] == "wall" and "this session ends in 1 second (" in argv[1]
    assert runtime.containers == {}


async def test_a_warning_that_fails_unexpectedly_does_not_stop_the_clock(
    make_client, runtime, monkeypatch
):
    """Not a Docker error, say a broken payload: the warning is logged and the session
    still ends on time (a dead timer would leave it to the next sweep, an hour here)."""
    client = await make_client(expiry_warnings=(1.0,))

    async def broken(*args, **kwargs):
        raise RuntimeError("payload error")

    monkeypatch.setattr(runtime, "exec", broken)
    body = await (await create(client, ttl_seconds=2)).json()
    assert (await ended(client, body["session_id"]))["reason"] == "ttl_expired"

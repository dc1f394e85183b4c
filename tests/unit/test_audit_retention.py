"""``--audit-retention-days``: the sweep deletes audit events and ended connection records
older than the retention, and nothing younger, nor a connection still open."""

from __future__ import annotations

import asyncio

from gateway.api import keys
from tests.unit.helpers import KEX_END, connections_written, create, hello

BANNER = b"SSH-2.0-retention-test"


async def audited(client) -> list[tuple[str, str]]:
    events = (await (await client.get("/audit")).json())["events"]
    return sorted((e["user_id"], e["event"]) for e in events)


async def test_the_sweep_prunes_what_is_past_the_retention(make_client, clock):
    client = await make_client(audit_retention_days=1 / 1440)  # a minute
    alice = await (await create(client, user_id="alice")).json()
    await hello(alice["ssh_port"], BANNER)  # a connection, ended
    await connections_written(client.app)
    reader, writer = await asyncio.open_connection("127.0.0.1", alice["ssh_port"])
    writer.write(BANNER + b"\r\n" + KEX_END)  # and one that stays open across the sweep
    await reader.readline()  # relayed; recorded once the relay has seen the key exchange end
    async with asyncio.timeout(5):
        while len(await audited(client)) < 4:  # noqa: ASYNC110 (created, connect, disconnect, connect)
            await asyncio.sleep(0.01)
    clock.advance(5 * 60)  # alice's session (an hour) lives on
    await create(client, user_id="bob")
    sessions = client.app[keys.SESSIONS]
    try:
        await sessions.sweep()
        assert await audited(client) == [("bob", "session_created")]
        url = f"/sessions/{alice['session_id']}/connections"
        records = (await (await client.get(url)).json())["connections"]
        assert [r["ended_at"] for r in records] == [None]  # the open one stays
    finally:
        writer.close()

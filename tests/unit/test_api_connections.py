"""PATCH, the audit API and /metrics against fake Docker, with real relayed sockets."""

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.helpers import create, packet

CLIENT_BANNER = b"SSH-2.0-TestClient\r\n"
KEX_END = packet(21)  # NEWKEYS: past its key exchange, a connection is recorded in full


async def relay_once(port: int, payload: bytes = b"") -> bytes:
    """Connect through the session port, say hello and end a key exchange, send
    ``payload``, close, read all."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(CLIENT_BANNER + KEX_END + payload)
    writer.write_eof()
    data = await reader.read()
    writer.close()
    return data


async def wait_disconnects(client, session_id: str, count: int) -> list[dict]:
    """The connection records are written as the relay ends; wait for ``count`` of them."""
    async with asyncio.timeout(5):
        while True:
            body = await (await client.get(f"/sessions/{session_id}/connections")).json()
            ended = [c for c in body["connections"] if c["ended_at"] is not None]
            if len(ended) >= count:
                return ended
            await asyncio.sleep(0.05)  # another task writes them


async def test_patch_extends_and_bounds(make_client):
    client = await make_client(max_ttl_minutes=120)
    session = await (await create(client, ttl_minutes=10)).json()
    url = f"/sessions/{session['session_id']}"
    resp = await client.patch(url, json={"extend_minutes": 20})
    assert resp.status == 200
    view = await resp.json()
    assert view["ttl_minutes"] == 30 and view["expires_at"] == "2026-01-01T00:30:00Z"
    resp = await client.patch(url, json={"ttl_minutes": 90})
    assert (await resp.json())["expires_at"] == "2026-01-01T01:30:00Z"
    for body, code in [
        ({"ttl_minutes": 121}, "invalid_ttl"),
        ({"extend_minutes": 31}, "invalid_ttl"),
        ({"extend_minutes": 1, "ttl_minutes": 5}, "invalid_request"),
        ({}, "invalid_request"),
        ({"extend_hours": 1}, "invalid_request"),
    ]:
        resp = await client.patch(url, json=body)
        assert (resp.status, (await resp.json())["code"]) == (400, code), body
    resp = await client.patch("/sessions/nope", json={"extend_minutes": 1})
    assert resp.status == 404
    view = await (await client.get(url)).json()
    assert view["expires_at"] == "2026-01-01T01:30:00Z"  # refused PATCHes changed nothing


async def test_connections_audit_and_metrics_agree(make_client, tmp_path):
    client = await make_client(audit_log=tmp_path / "audit.log")
    session = await (await create(client)).json()
    sid = session["session_id"]
    echoed = await relay_once(session["ssh_port"], b"hello")
    assert echoed.startswith(b"SSH-2.0-AsyncSSH")
    (ours,) = await wait_disconnects(client, sid, 1)  # the readiness check is not recorded
    assert ours["client_banner"] == "SSH-2.0-TestClient"
    assert ours["bytes_client_to_container"] == len(CLIENT_BANNER + KEX_END) + 5
    assert ours["server_banner"].startswith("SSH-2.0-AsyncSSH")
    assert ours["reason"] in ("client_closed", "server_closed")

    await client.delete(f"/sessions/{sid}")
    # records outlive the session
    kept = await (await client.get(f"/sessions/{sid}/connections")).json()
    assert kept["count"] == 1
    assert (await client.get("/sessions/never/connections")).status == 404

    events = (await (await client.get("/audit", params={"session_id": sid})).json())["events"]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "session_deleted" and kinds.count("session_created") == 1
    assert kinds.count("connect") == 1 and kinds.count("disconnect") == 1
    lines = (tmp_path / "audit.log").read_text().splitlines()
    assert len(lines) == len(events)

    text = await (await client.get("/metrics")).text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    by_reason = {
        s.labels["reason"]: s.value
        for s in families["sandman_connections_ended"].samples
        if s.name.endswith("_total")
    }
    for reason in {c["reason"] for c in kept["connections"]}:
        assert by_reason[reason] == sum(c["reason"] == reason for c in kept["connections"])
    assert sum(by_reason.values()) == 1
    relayed = {
        s.labels["direction"]: s.value
        for s in families["sandman_relayed_bytes"].samples
        if s.name.endswith("_total")
    }
    assert relayed["up"] == sum(c["bytes_client_to_container"] for c in kept["connections"])
    assert relayed["down"] == sum(c["bytes_container_to_client"] for c in kept["connections"])
    created = families["sandman_session_create_seconds"].samples
    assert [s.value for s in created if s.name.endswith("_count")] == [1]


async def test_audit_pagination_and_filters(make_client):
    client = await make_client()
    for user in ("a", "b", "c"):
        await create(client, user_id=user)
    first = await (await client.get("/audit", params={"limit": "2"})).json()
    assert len(first["events"]) == 2 and first["next_cursor"] is not None
    rest = await (
        await client.get("/audit", params={"limit": "1000", "cursor": first["next_cursor"]})
    ).json()
    ids = [e["id"] for e in first["events"] + rest["events"]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    assert rest["next_cursor"] is None
    only_b = await (await client.get("/audit", params={"user_id": "b"})).json()
    assert {e["user_id"] for e in only_b["events"]} == {"b"}
    future = await (await client.get("/audit", params={"since": "2999-01-01T00:00:00Z"})).json()
    assert future["events"] == []


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "x"},
        {"since": "yesterday"},
        {"colour": "red"},
        {"cursor": "9" * 40},  # beyond an SQLite integer
        {"cursor": "-1"},
    ],
)
async def test_audit_bad_query(make_client, params):
    client = await make_client()
    resp = await client.get("/audit", params=params)
    assert (resp.status, (await resp.json())["code"]) == (400, "invalid_request")


async def test_metrics_needs_auth(make_client):
    client = await make_client()
    resp = await client.get("/metrics", headers={"Authorization": ""})
    assert resp.status == 401

"""The session lifecycle under races and failures, driven deterministically: the fake runtime
stops at a named step until the test opens it, and DELETE, PATCH and the sweep run into
each gap. After each: rows = containers = listeners, and nothing ends twice."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sqlite3
from datetime import UTC, datetime

import aiohttp
import pytest

from gateway.api import keys
from gateway.gpu.sim import SimBackend
from gateway.models import CloseReason, ConnectionRecord
from gateway.store import Store
from tests.net import UNIT_PORT_BASE as FIRST_PORT
from tests.net import port_bindable
from tests.unit.conftest import TOKEN
from tests.unit.helpers import CLIENT_KEX, create

PORTS = range(FIRST_PORT, FIRST_PORT + 20)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def assert_consistent(client, runtime) -> list:
    """Every row is running, with its container and its listener, and nothing else is."""
    rows = await client.app[keys.STORE].list_sessions()
    assert {r.state.value for r in rows} <= {"running"}
    assert sorted(r.container_id for r in rows) == sorted(runtime.containers)
    assert {p for p in PORTS if not port_bindable(p)} == {r.ssh_port for r in rows}
    return rows


async def audit_events(client) -> list[dict]:
    return (await (await client.get("/audit", params={"limit": "1000"})).json())["events"]


async def end_events(client) -> list[tuple[str, str]]:
    return [
        (e["session_id"], e["event"])
        for e in await audit_events(client)
        if e["event"] in ("session_deleted", "session_expired", "session_ended")
    ]


@pytest.mark.parametrize("step", ["create", "created", "put_files", "start", "sshd"])
async def test_delete_during_each_create_step_cancels_and_rolls_back(make_client, runtime, step):
    client = await make_client()
    gate = runtime.pause(step)
    post = asyncio.create_task(create(client))
    await gate.reached.wait()
    (starting,) = await (await client.get("/sessions")).json()
    assert starting["state"] == "starting"

    deleted = await client.delete(f"/sessions/{starting['id']}")
    assert deleted.status == 200
    resp = await post
    assert (resp.status, (await resp.json())["code"]) == (409, "session_deleted")
    assert await assert_consistent(client, runtime) == []
    assert await end_events(client) == []  # it never ran, so it never ends in the trail
    runtime.gates.clear()
    again = await create(client)  # the user, port and name are free again
    assert again.status == 201


async def test_the_sweep_leaves_a_starting_session_alone(make_client, runtime):
    client = await make_client()
    gate = runtime.pause("sshd")
    post = asyncio.create_task(create(client))
    await gate.reached.wait()
    assert await client.app[keys.SESSIONS].sweep() == 0
    gate.open()
    assert (await post).status == 201
    assert len(await assert_consistent(client, runtime)) == 1


@pytest.mark.parametrize("step", ["create", "start"])  # before and after the files are copied
async def test_patch_while_starting_applies_when_it_starts(make_client, runtime, step):
    client = await make_client()
    gate = runtime.pause(step)
    post = asyncio.create_task(create(client, ttl_seconds=2))
    await gate.reached.wait()
    (starting,) = await (await client.get("/sessions")).json()
    patched = await client.patch(f"/sessions/{starting['id']}", json={"ttl_minutes": 60})
    assert patched.status == 200
    gate.open()
    body = await (await post).json()
    assert body["expires_at"] == "2026-01-01T01:00:00Z"
    (container,) = runtime.containers.values()
    assert b'expiry-time="20260101010000Z"' in container.files["/etc/ssh/authorized_keys/alice"]
    view = await (await client.get(f"/sessions/{body['session_id']}")).json()
    assert (view["state"], view["expires_at"]) == ("running", "2026-01-01T01:00:00Z")


async def test_a_failed_removal_during_rollback_is_finished_by_the_sweep(make_client, runtime):
    client = await make_client()
    runtime.mode = "crash"
    runtime.failing.add("remove")
    resp = await create(client)
    assert (resp.status, (await resp.json())["code"]) == (502, "container_start_failed")
    (left,) = await (await client.get("/sessions")).json()
    assert left["state"] == "ending" and len(runtime.containers) == 1
    assert port_bindable(left["ssh_port"])  # connections are cut at once ...
    runtime.mode = "ok"
    other = await (await create(client, user_id="bob")).json()  # ... the port stays held
    assert other["ssh_port"] != left["ssh_port"]

    runtime.failing.clear()
    assert await client.app[keys.SESSIONS].sweep() == 1  # the leftover
    (running,) = await assert_consistent(client, runtime)
    assert running.user_id == "bob"
    assert (await client.delete(f"/sessions/{other['session_id']}")).status == 200
    assert runtime.containers == {}
    assert await assert_consistent(client, runtime) == []


async def test_a_failed_end_stays_ending_until_the_sweep_finishes_it(make_client, runtime):
    client = await make_client()
    sid = (await (await create(client)).json())["session_id"]
    runtime.failing.add("remove")
    resp = await client.delete(f"/sessions/{sid}")
    assert (resp.status, (await resp.json())["code"]) == (503, "docker_unavailable")
    view = await (await client.get(f"/sessions/{sid}")).json()
    assert view["state"] == "ending" and view["active_connections"] == 0
    patch = await client.patch(f"/sessions/{sid}", json={"extend_minutes": 5})
    assert (patch.status, (await patch.json())["code"]) == (409, "session_ending")

    runtime.failing.clear()
    assert await client.app[keys.SESSIONS].sweep() == 1
    assert await assert_consistent(client, runtime) == []
    assert await end_events(client) == [(sid, "session_deleted")]  # once, with DELETE's reason


async def test_a_sweep_from_a_stale_list_does_not_end_sessions_twice(make_client, runtime):
    client = await make_client()
    for i in range(20):
        assert (await create(client, user_id=f"u{i}")).status == 201
    gate = runtime.pause("inspect")
    sweep = asyncio.create_task(client.app[keys.SESSIONS].sweep())
    await gate.reached.wait()  # the sweep has read every row and stopped at the first
    resp = await client.delete("/sessions")
    assert (await resp.json())["deleted"] == 20
    gate.open()
    assert await sweep == 0
    ends = await end_events(client)
    assert len(ends) == 20 and {event for _, event in ends} == {"session_deleted"}
    assert await assert_consistent(client, runtime) == []


async def test_recovery_isolates_a_broken_session(make_client, runtime):
    client = await make_client()
    broken = (await (await create(client, user_id="a")).json())["session_id"]
    fine = (await (await create(client, user_id="b")).json())["session_id"]
    await client.close()  # the gateway stops; containers and rows stay
    row = next(c for c in runtime.containers.values() if c.spec.labels["sandman.user_id"] == "a")
    row.running = False  # ... and a's container stopped meanwhile, and will not start again
    runtime.failing.add("start")

    client = await make_client()  # starts and serves despite a's failure
    views = {v["id"]: v["state"] for v in await (await client.get("/sessions")).json()}
    assert views == {broken: "ending", fine: "running"}
    runtime.failing.clear()
    assert await client.app[keys.SESSIONS].sweep() == 1
    (left,) = await assert_consistent(client, runtime)
    assert left.id == fine


async def test_a_container_removed_behind_our_back_ends_its_session(make_client, runtime):
    client = await make_client()
    sid = (await (await create(client)).json())["session_id"]
    (cid,) = runtime.containers
    runtime.kill(cid)  # docker rm -f: the event arrives, no sweep runs
    async with asyncio.timeout(5):
        while True:
            if await end_events(client) == [(sid, "session_ended")]:
                break
            await asyncio.sleep(0.02)  # the watcher ends it in a task of its own
    assert await assert_consistent(client, runtime) == []


async def test_a_second_create_for_a_user_allocates_nothing(make_client, runtime):
    client = await make_client()
    assert (await create(client)).status == 201
    gpus = client.app[keys.GPUS]
    calls = []
    original = gpus.allocate

    async def counting(*args, **kwargs):
        calls.append(args)
        return await original(*args, **kwargs)

    gpus.allocate = counting
    resp = await create(client)
    assert (resp.status, (await resp.json())["code"]) == (409, "session_exists")
    assert calls == []


async def test_an_audit_failure_after_create_keeps_the_session_and_its_key(
    make_client, runtime, monkeypatch
):
    client = await make_client()
    audit = client.app[keys.AUDIT]

    async def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(audit, "session_event", broken)
    resp = await create(client)
    assert resp.status == 201
    assert (await resp.json())["ssh_private_key"].startswith("-----BEGIN OPENSSH")
    assert len(await assert_consistent(client, runtime)) == 1


@pytest.mark.parametrize("step", ["created", "sshd"])
async def test_a_slice_made_for_a_cancelled_start_goes_back_and_is_never_shared(
    make_client, runtime, tmp_path, step
):
    """On a simulated A100-80GB with --mig-dynamic (two 3g.40gb fit), a DELETE during the
    start destroys the instance made for it; the next two creates get the two slices."""
    topology = tmp_path / "a100.json"
    topology.write_text(json.dumps({"host": "t", "gpus": [{"model": "A100-80GB", "mig": True}]}))
    client = await make_client(
        gpu_factory=lambda: SimBackend(topology, tmp_path / "sim-state.json"),
        mig_dynamic=True,
        default_mig_profile="3g.40gb",
    )
    gate = runtime.pause(step)
    post = asyncio.create_task(create(client, user_id="a"))
    await gate.reached.wait()
    (starting,) = await (await client.get("/sessions")).json()
    assert starting["gpu_uuid"].startswith("MIG-")
    assert (await client.delete(f"/sessions/{starting['id']}")).status == 200
    assert (await post).status == 409
    runtime.gates.clear()
    assert (await (await client.get("/gpus")).json())["gpus"][0]["mig_instances"] == []

    made = [await (await create(client, user_id=u)).json() for u in ("b", "c")]
    assert len({m["gpu_uuid"] for m in made}) == 2
    full = await create(client, user_id="d")
    assert (full.status, (await full.json())["code"]) == (503, "no_gpu_available")
    rows = await assert_consistent(client, runtime)
    assert sorted(r.gpu_uuid for r in rows) == sorted(m["gpu_uuid"] for m in made)


async def test_patch_racing_an_end_is_409_session_ending(make_client, runtime):
    """The PATCH is copying files when a DELETE marks the row ending: it must not answer
    200 with a new expiry for a session that is about to vanish."""
    client = await make_client()
    sid = (await (await create(client)).json())["session_id"]
    files, removal = runtime.pause("put_files"), runtime.pause("remove")
    patch = asyncio.create_task(client.patch(f"/sessions/{sid}", json={"ttl_minutes": 60}))
    await files.reached.wait()
    delete = asyncio.create_task(client.delete(f"/sessions/{sid}"))
    await removal.reached.wait()  # the row is ending, connections are cut
    files.open()
    resp = await patch
    assert (resp.status, (await resp.json())["code"]) == (409, "session_ending")
    removal.open()
    assert (await delete).status == 200
    assert await end_events(client) == [(sid, "session_deleted")]
    extended = [e for e in await audit_events(client) if e["event"] == "session_extended"]
    assert extended == []


async def test_a_failed_first_write_of_an_end_keeps_the_listener_for_the_retry(
    make_client, runtime, monkeypatch
):
    """Disk full on ``begin_ending``: the retried DELETE must close the port it holds, not
    answer 200 while it stays bound and relays to an address Docker may reuse."""
    client = await make_client()
    body = await (await create(client)).json()
    store = client.app[keys.STORE]
    real = store.begin_ending

    async def disk_full_once(*args):
        monkeypatch.setattr(store, "begin_ending", real)
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "begin_ending", disk_full_once)
    assert (await client.delete(f"/sessions/{body['session_id']}")).status == 500
    assert not port_bindable(body["ssh_port"])  # still running, still relaying
    assert (await client.delete(f"/sessions/{body['session_id']}")).status == 200
    assert await assert_consistent(client, runtime) == []  # the port is free again
    assert await end_events(client) == [(body["session_id"], "session_deleted")]


async def test_the_end_event_and_the_row_go_together(make_client, runtime):
    """The end event cannot be written (a full disk, say): the row stays ``ending``, and
    the retry writes the one end event. Never a row gone without its end in the trail."""
    client = await make_client()
    sid = (await (await create(client)).json())["session_id"]
    conn = client.app[keys.STORE]._conn
    await conn.execute(
        "CREATE TEMP TRIGGER full BEFORE INSERT ON audit_events WHEN NEW.event = "
        "'session_deleted' BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
    )
    assert (await client.delete(f"/sessions/{sid}")).status == 500
    (left,) = await (await client.get("/sessions")).json()
    assert left["state"] == "ending"
    await conn.execute("DROP TRIGGER full")
    assert await client.app[keys.SESSIONS].sweep() == 1
    assert await assert_consistent(client, runtime) == []
    assert await end_events(client) == [(sid, "session_deleted")]


async def test_records_closed_at_start_up_get_their_disconnect_events(make_client, runtime):
    client = await make_client()
    sid = (await (await create(client)).json())["session_id"]
    store = client.app[keys.STORE]
    opened = ConnectionRecord(
        "c1", sid, "alice", "127.0.0.1", 50000, started_at=datetime(2026, 1, 1, tzinfo=UTC)
    )
    await store.save_connection(opened)  # a crash left it open
    await client.close()

    client = await make_client()
    (closed,) = await client.app[keys.STORE].connections(session_id=sid)
    assert closed.reason is CloseReason.ERROR and closed.ended_at is not None
    events = [e for e in await audit_events(client) if e["connection_id"] == "c1"]
    assert [(e["event"], e["reason"], e["closed_by"]) for e in events] == [
        ("disconnect", "error", "gateway")
    ]


async def test_a_port_taken_during_a_restart_moves_the_session_and_keeps_its_container(
    make_client, runtime
):
    client = await make_client()
    body = await (await create(client)).json()
    await client.close()
    with socket.socket() as squatter:  # another process took the port meanwhile
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAITs
        squatter.bind(("127.0.0.1", body["ssh_port"]))
        squatter.listen()
        client = await make_client()
        view = await (await client.get(f"/sessions/{body['session_id']}")).json()
        assert view["state"] == "running" and view["ssh_port"] != body["ssh_port"]
        assert f"-p {view['ssh_port']} " in view["ssh_command"]
        assert runtime.removed == [] and len(runtime.containers) == 1  # the jobs go on
        assert not port_bindable(view["ssh_port"])
        (moved,) = [e for e in await audit_events(client) if e["event"] == "session_port_moved"]
        assert (moved["previous_ssh_port"], moved["ssh_port"]) == (
            body["ssh_port"],
            view["ssh_port"],
        )
    again = await create(client, user_id="bob")  # the moved port is held, the old one free
    assert (await again.json())["ssh_port"] == body["ssh_port"]


async def _wait_for_no_rows(store) -> None:
    async with asyncio.timeout(10):
        while True:
            if not await store.list_sessions():
                return
            await asyncio.sleep(0.02)  # the rollback runs in the server's own tasks


async def test_a_caller_that_leaves_mid_create_leaves_nothing(make_runner, runtime):
    """Served as in production: the caller gives up while the container starts. The 201
    would carry the only copy of the key: the session goes, and the next POST gets 201."""
    app, url, _ = await make_runner(start_timeout=60)  # the default: it does not end it
    gate = runtime.pause("put_files")
    async with aiohttp.ClientSession(headers=AUTH) as http:
        post = asyncio.create_task(http.post(f"{url}/sessions", json={"user_id": "alice"}))
        await gate.reached.wait()
        post.cancel()  # a client timeout, a proxy's 504, Ctrl-C: the connection closes
        with contextlib.suppress(asyncio.CancelledError):
            await post
    await _wait_for_no_rows(app[keys.STORE])
    runtime.gates.clear()
    assert runtime.containers == {}
    async with aiohttp.ClientSession(headers=AUTH) as http:
        again = await http.post(f"{url}/sessions", json={"user_id": "alice"})
        assert again.status == 201


async def test_sigterm_with_a_create_in_flight_cuts_connections_within_the_grace(
    make_runner, runtime, tmp_path
):
    """systemd and compose send SIGKILL 30 s after SIGTERM: by then the relayed connections
    must be cut (records end ``gateway_shutdown``) and the audit queue written."""
    _, url, runner = await make_runner(start_timeout=60)  # the default
    async with aiohttp.ClientSession(headers=AUTH) as http:
        resp = await http.post(f"{url}/sessions", json={"user_id": "alice"})
        alice = await resp.json()
        reader, writer = await asyncio.open_connection("127.0.0.1", alice["ssh_port"])
        writer.write(CLIENT_KEX)  # past its key exchange: recorded in full
        assert (await reader.readline()).startswith(b"SSH-2.0-")  # relayed to its sshd
        gate = runtime.pause("put_files")
        post = asyncio.create_task(http.post(f"{url}/sessions", json={"user_id": "bob"}))
        await gate.reached.wait()
        async with asyncio.timeout(20):  # well inside the 30 s, whatever the create does
            await runner.cleanup()
        await reader.read()  # what was relayed, then the end: cut
        assert reader.at_eof()
        writer.close()
        stopped = await post  # bob's create was rolled back, and he is told why
        assert (stopped.status, (await stopped.json())["code"]) == (503, "gateway_stopping")
    async with await Store.open(tmp_path / "state" / "sessions.db") as store:
        (record,) = await store.connections(session_id=alice["session_id"])
        assert record.reason is CloseReason.GATEWAY_SHUTDOWN
        disconnects = [e for e in await store.events() if e.event == "disconnect"]
        assert [e.connection_id for e in disconnects] == [record.id]
        assert [s.user_id for s in await store.list_sessions()] == ["alice"]  # bob rolled back


async def test_a_hung_removal_does_not_stop_the_sweep_of_the_others(
    make_client, runtime, clock, monkeypatch
):
    """One ``docker rm -f`` never returns: the sweep still ends every other session, and
    gives that one up for this round within its budget."""
    monkeypatch.setattr("gateway.sessions.SWEEP_BUDGET_SECONDS", 0.2)
    client = await make_client()
    made = [await (await create(client, user_id=u, ttl_minutes=1)).json() for u in "abc"]
    stuck = made[0]["container_id"]
    remove = runtime.remove

    async def hangs_for_one(container_id: str) -> None:
        if container_id == stuck:
            await asyncio.Event().wait()
        await remove(container_id)

    monkeypatch.setattr(runtime, "remove", hangs_for_one)
    clock.advance(61)
    async with asyncio.timeout(5):
        assert await client.app[keys.SESSIONS].sweep() == 2
    (left,) = await client.app[keys.STORE].list_sessions()
    assert (left.id, left.state.value) == (made[0]["session_id"], "ending")
    assert list(runtime.containers) == [stuck]
    monkeypatch.setattr(runtime, "remove", remove)


async def test_the_container_watcher_survives_an_unexpected_error(
    make_client, runtime, monkeypatch
):
    """A broken event (not a Docker error) is logged and the stream followed again: a
    container removed afterwards still ends its session without waiting for the sweep."""
    monkeypatch.setattr("gateway.sessions.WATCH_RETRY_SECONDS", 0.01)
    follow = runtime.container_exits
    calls = []

    async def breaks_once(instance: str):
        calls.append(instance)
        if len(calls) == 1:
            raise KeyError("Actor")
        async for session_id in follow(instance):
            yield session_id

    monkeypatch.setattr(runtime, "container_exits", breaks_once)
    client = await make_client()
    sid = (await (await create(client)).json())["session_id"]
    (cid,) = runtime.containers
    runtime.kill(cid)
    async with asyncio.timeout(5):
        while True:
            if await end_events(client) == [(sid, "session_ended")]:
                break
            await asyncio.sleep(0.02)  # the watcher ends it in a task of its own


async def test_a_create_that_times_out_as_it_is_marked_running_never_ends_in_the_trail(
    make_client, runtime, monkeypatch
):
    """The start timeout fires while ``running`` is being written: the row ran, but the
    session was never created (no 201, no ``session_created``), so it has no end event."""
    client = await make_client(start_timeout=1)
    store = client.app[keys.STORE]
    mark_running = store.mark_running

    async def slow_commit(*args):
        done = await mark_running(*args)
        await asyncio.sleep(30)  # the commit's answer comes after the start timeout
        return done

    monkeypatch.setattr(store, "mark_running", slow_commit)
    resp = await create(client)
    assert (resp.status, (await resp.json())["code"]) == (502, "container_start_failed")
    assert await assert_consistent(client, runtime) == []
    events = {e["event"] for e in await audit_events(client)}
    assert not events & {"session_created", "session_ended", "session_deleted"}, events

"""The gateway against a Docker as unkind as the real one (``FakeRuntime``'s defaults and
options): containers without an address, events for every removal (the gateway's own too,
and two for one), an event stream that breaks, and calls that are slow or never return."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway import sessions
from gateway.api import keys, routes
from gateway.runtime.base import LABEL_SESSION, ContainerSpec
from tests.fakes import FakeContainer
from tests.net import UNIT_PORT_BASE, port_bindable
from tests.unit.helpers import create, hello

PORTS = range(UNIT_PORT_BASE, UNIT_PORT_BASE + 20)


async def rows(client) -> list:
    return await client.app[keys.STORE].list_sessions()


async def events_handled(runtime) -> None:
    """Until the watcher has taken every event the fake engine sent (then a step more, for
    what it does with the last)."""
    async with asyncio.timeout(5):
        while any(not queue.empty() for queue in runtime.subscribers):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    await asyncio.sleep(0)


async def subscribed(runtime) -> None:
    async with asyncio.timeout(5):
        while not runtime.subscribers:  # noqa: ASYNC110 (the watcher resubscribes on its own)
            await asyncio.sleep(0.01)


async def test_a_container_without_an_address_fails_the_create_and_rolls_back(make_client, runtime):
    runtime.no_address = True
    client = await make_client()
    resp = await create(client)
    body = await resp.json()
    assert (resp.status, body["code"]) == (502, "container_start_failed")
    assert "no address on network" in body["error"]
    assert runtime.containers == {} and await rows(client) == []
    assert all(port_bindable(p) for p in PORTS)
    runtime.no_address = False
    assert (await create(client)).status == 201  # user, port and name are free again


async def test_the_events_of_our_own_removals_end_nothing_else(make_client, runtime):
    client = await make_client()
    await subscribed(runtime)
    first = await (await create(client)).json()
    bob = await (await create(client, user_id="bob")).json()
    assert (await client.delete(f"/sessions/{first['session_id']}")).status == 200
    again = await (await create(client)).json()  # alice again, while her old events arrive
    await events_handled(runtime)
    live = {r.id: r.state.value for r in await rows(client)}
    assert live == {bob["session_id"]: "running", again["session_id"]: "running"}


async def test_two_events_for_one_container_end_its_session_once(make_client, runtime):
    client = await make_client()
    await subscribed(runtime)
    session = await (await create(client)).json()
    runtime.kill(session["container_id"])  # docker rm -f: die, then destroy
    await events_handled(runtime)
    async with asyncio.timeout(5):
        while await rows(client):  # noqa: ASYNC110 (the end runs in a task of its own)
            await asyncio.sleep(0.01)
    await client.app[keys.AUDIT].flush()
    query = {"session_id": session["session_id"]}
    events = (await (await client.get("/audit", params=query)).json())["events"]
    ended = [e["reason"] for e in events if e["event"] == "session_ended"]
    assert ended == ["container_gone"]


async def test_after_the_event_stream_breaks_the_watcher_resubscribes_and_the_sweep_covers_the_gap(
    make_client, runtime, monkeypatch
):
    monkeypatch.setattr(sessions, "WATCH_RETRY_SECONDS", 0.05)
    client = await make_client()
    await subscribed(runtime)
    lost = await (await create(client)).json()
    seen = await (await create(client, user_id="bob")).json()
    runtime.break_events()
    runtime.kill(lost["container_id"])  # while no stream is open: Docker keeps no events
    await events_handled(runtime)  # the watcher has seen its stream end
    await subscribed(runtime)
    runtime.kill(seen["container_id"])
    await events_handled(runtime)
    async with asyncio.timeout(5):
        while seen["session_id"] in {r.id for r in await rows(client)}:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert [r.id for r in await rows(client)] == [lost["session_id"]]  # missed: still there
    assert await client.app[keys.SESSIONS].sweep() == 1  # the backstop finds it
    assert await rows(client) == []


async def test_a_hung_engine_makes_healthz_degraded_not_hung(make_client, runtime, monkeypatch):
    monkeypatch.setattr(routes, "HEALTH_TIMEOUT", 0.2)
    client = await make_client()
    runtime.pause("ping")  # never opened: the call never returns
    async with asyncio.timeout(5):
        resp = await client.get("/healthz")
    body = await resp.json()
    assert resp.status == 503 and list(body["failing"]) == ["docker"]


@pytest.mark.parametrize("step", ["create", "start", "put_files"])
async def test_a_call_that_never_returns_fails_the_create_in_the_start_timeout(
    make_client, runtime, step
):
    client = await make_client(start_timeout=0.3)
    runtime.pause(step)
    async with asyncio.timeout(5):
        resp = await create(client)
    assert (resp.status, (await resp.json())["code"]) == (502, "container_start_failed")
    assert await rows(client) == [] and runtime.containers == {}


async def test_a_slow_engine_still_gives_one_session_per_user(make_client, runtime):
    runtime.delay = 0.02
    client = await make_client()
    results = await asyncio.gather(*(create(client) for _ in range(3)))
    assert sorted(r.status for r in results) == [201, 409, 409]
    (session,) = [await r.json() for r in results if r.status == 201]
    assert (await client.delete(f"/sessions/{session['session_id']}")).status == 200
    assert runtime.containers == {} and await rows(client) == []


def replace_name_and_session(session, name: str) -> ContainerSpec:
    """Another container that took this session's name (another session's label)."""
    return ContainerSpec(
        name=name, image="i", hostname="h", env={}, labels={LABEL_SESSION: "another"},
        workspace=Path("/w"), home="/home/x", network="n", pids_limit=1,
    )  # fmt: skip


async def test_a_name_in_use_by_another_container_is_refused_and_that_container_kept(
    make_client, runtime
):
    client = await make_client()
    gate = runtime.pause("create")
    post = asyncio.create_task(create(client))
    await gate.reached.wait()
    (starting,) = await rows(client)
    name = f"sandman-alice-{starting.id[:8]}"
    stranger = FakeContainer(spec=replace_name_and_session(starting, name), id="stranger")
    runtime.containers["stranger"] = stranger
    gate.open()
    resp = await post
    body = await resp.json()
    assert (resp.status, body["code"]) == (502, "container_start_failed")
    assert "is already in use" in body["error"]
    assert list(runtime.containers) == ["stranger"]  # not ours: left alone


async def test_a_restart_leaves_the_containers_running_and_a_recovered_session_relays(
    make_client, runtime
):
    client = await make_client()
    session = await (await create(client)).json()
    await client.close()  # the gateway stops; Docker's containers keep running
    await make_client()  # the next start adopts the session
    assert (await hello(session["ssh_port"], b"SSH-2.0-after-restart")).startswith(b"SSH-2.0-")

"""The waiting list and GPU-hour budgets through the API, on a simulated A100 with dynamic
MIG (seven 1g slices), the fake runtime and a settable clock."""

import asyncio
import json

import bcrypt
import pytest
from cryptography.hazmat.primitives import serialization

from gateway.api.keys import SESSIONS, STORE, WAITING
from gateway.config import config_from_args, parse
from gateway.core.fairshare import MAX_START_ATTEMPTS
from gateway.gpu.sim import SimBackend
from gateway.session_files import AUTHORIZED_KEYS_DIR, PASSWORD_HASH
from gateway.store import Store
from gateway.waiting import NO_CAPACITY_RETRY_SECONDS
from tests.net import UNIT_PORT_BASE
from tests.unit.helpers import CLIENT_KEX, a_session

SLICES = 7


@pytest.fixture
def a100(tmp_path):
    topology = tmp_path / "a100.json"
    topology.write_text(json.dumps({"host": "t", "gpus": [{"model": "A100-80GB", "mig": True}]}))
    return lambda: SimBackend(topology, tmp_path / "sim-state.json")


@pytest.fixture
def make_sim(make_client, a100):
    async def make(**overrides):
        settings = dict(gpu_factory=a100, mig_dynamic=True, default_mig_profile="1g.10gb")
        return await make_client(**{**settings, **overrides})

    return make


async def post(client, user, **body):
    resp = await client.post("/sessions", json={"user_id": user, **body})
    return resp.status, await resp.json()


async def fill(client, prefix="u"):
    """Take all seven slices; the sessions' ids."""
    ids = []
    for i in range(SLICES):
        status, body = await post(client, f"{prefix}{i}")
        assert status == 201, body
        ids.append(body["session_id"])
    return ids


async def state_of(client, session_id):
    resp = await client.get(f"/sessions/{session_id}")
    return (await resp.json()) if resp.status == 200 else None


async def until(check, what, tries=200):
    for _ in range(tries):
        if result := await check():
            return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def running(client, session_id):
    async def check():
        view = await state_of(client, session_id)
        return view if view and view["state"] == "running" else None

    return await until(check, f"{session_id} running")


def assert_got_credentials(runtime, view, queued):
    """The session's container got the 202's key and password (their public halves)."""
    container = runtime.containers[view["container_id"]]
    key = serialization.load_ssh_private_key(queued["ssh_private_key"].encode(), None)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    assert public.split()[1] in container.files[f"{AUTHORIZED_KEYS_DIR}/{view['user_id']}"]
    stored_hash = container.files[PASSWORD_HASH].strip()
    assert bcrypt.checkpw(queued["ssh_password"].encode(), stored_hash)


async def reached(gate):
    async with asyncio.timeout(10):
        await gate.reached.wait()


async def start_held(client, runtime, holder):
    """End ``holder``: the head of the list starts, and is held at its container's create
    (the gate)."""
    gate = runtime.pause("create")
    await client.delete(f"/sessions/{holder}")
    await reached(gate)
    return gate


async def events(client, name):
    body = await (await client.get("/audit", params={"limit": "1000"})).json()
    return [e for e in body["events"] if e["event"] == name]


async def test_eighth_request_waits_and_starts_with_its_credentials(make_sim, runtime):
    client = await make_sim()
    ids = await fill(client)
    status, body = await post(client, "late")
    assert (status, body["code"]) == (503, "no_gpu_available")  # without wait: as before
    status, queued = await post(client, "late", wait=True)
    assert status == 202, queued
    assert queued["state"] == "queued" and queued["queue_position"] == 1
    assert queued["ssh_port"] is None and queued["ssh_private_key"] and queued["ssh_password"]
    view = await state_of(client, queued["session_id"])
    assert (view["state"], view["queue_position"]) == ("queued", 1)
    assert "ssh_password" not in view and "ssh_private_key" not in view
    assert (await (await client.get("/queue")).json())["count"] == 1

    assert (await client.delete(f"/sessions/{ids[0]}")).status == 200
    view = await running(client, queued["session_id"])
    assert view["ssh_port"] and view["mig_profile"] == "1g.10gb"
    assert_got_credentials(runtime, view, queued)
    assert [e["session_id"] for e in await events(client, "session_queued")] == [view["id"]]
    assert [e["session_id"] for e in await events(client, "session_dequeued")] == [view["id"]]
    assert (await (await client.get("/queue")).json())["count"] == 0
    metrics = await (await client.get("/metrics")).text()
    assert "sandman_queue_wait_seconds_count 1.0" in metrics


async def test_waiting_users_start_in_usage_order_not_arrival(make_sim, clock):
    client = await make_sim()
    _, heavy = await post(client, "heavy")  # an hour of a 1g slice
    clock.advance(3600)
    assert (await client.delete(f"/sessions/{heavy['session_id']}")).status == 200
    ids = await fill(client)
    _, first = await post(client, "heavy", wait=True)
    clock.advance(1)
    _, second = await post(client, "light", wait=True)
    assert (first["queue_position"], second["queue_position"]) == (1, 1)  # less used: first
    assert (await state_of(client, first["session_id"]))["queue_position"] == 2
    assert (await state_of(client, second["session_id"]))["queue_position"] == 1

    assert (await client.delete(f"/sessions/{ids[0]}")).status == 200
    await running(client, second["session_id"])
    view = await state_of(client, first["session_id"])
    assert (view["state"], view["queue_position"]) == ("queued", 1)


async def test_backfill_only_what_cannot_delay_the_head(make_sim):
    client = await make_sim()
    ids = await fill(client)  # seven 1g slices, each for an hour
    _, head = await post(client, "big", mig_profile="3g.40gb", wait=True)
    await client.delete(f"/sessions/{ids[0]}")  # one slice free: the 3g head does not fit
    _, late = await post(client, "long", ttl_minutes=120, wait=True)  # would outlast them
    _, short = await post(client, "short", ttl_minutes=30, wait=True)  # gone before any
    await running(client, short["session_id"])
    assert (await state_of(client, head["session_id"]))["queue_position"] == 1
    assert (await state_of(client, late["session_id"]))["queue_position"] == 2


async def test_withdraw_and_per_user_limit(make_sim):
    client = await make_sim()
    await fill(client)
    _, queued = await post(client, "late", wait=True)
    status, body = await post(client, "late", wait=True)
    assert (status, body["code"]) == (409, "too_many_queued")
    resp = await client.delete(f"/sessions/{queued['session_id']}")
    assert resp.status == 200
    assert await state_of(client, queued["session_id"]) is None
    assert len(await events(client, "session_queue_withdrawn")) == 1
    status, _ = await post(client, "late", wait=True)  # room again on the list
    assert status == 202


async def test_queue_timeout_ends_a_waiting_request(make_sim, clock):
    client = await make_sim(queue_timeout=600)
    await fill(client)
    _, queued = await post(client, "late", wait=True)
    clock.advance(601)
    # the scheduler wakes at the deadline (it reads the settable clock once a step is due)
    await client.app[WAITING].step()
    assert await state_of(client, queued["session_id"]) is None
    [timed_out] = await events(client, "session_queue_timeout")
    assert timed_out["reason"] == "queue_timeout"


async def test_unclaimed_session_from_the_queue_ends(make_sim, clock):
    client = await make_sim(claim_timeout=900)
    ids = await fill(client)
    _, queued = await post(client, "late", wait=True)
    await client.delete(f"/sessions/{ids[0]}")
    await running(client, queued["session_id"])
    await client.app[WAITING].step()  # not yet due
    assert (await state_of(client, queued["session_id"]))["state"] == "running"
    clock.advance(901)
    await client.app[WAITING].step()
    assert await state_of(client, queued["session_id"]) is None
    ended = await events(client, "session_ended")
    assert [e["reason"] for e in ended] == ["not_claimed"]


async def test_a_connection_claims_a_session_from_the_queue(make_sim, clock):
    client = await make_sim(claim_timeout=900)
    ids = await fill(client)
    _, queued = await post(client, "late", wait=True)
    await client.delete(f"/sessions/{ids[0]}")
    view = await running(client, queued["session_id"])
    reader, writer = await asyncio.open_connection("127.0.0.1", view["ssh_port"])
    writer.write(CLIENT_KEX)  # past the key exchange: a login, not a port scan
    await reader.readline()  # the container's SSH banner: relayed
    writer.close()
    await writer.wait_closed()
    sessions = client.app[SESSIONS]
    for _ in range(100):  # the relay notices the close
        if sessions.connection_activity(view["id"])[1] is not None:
            break
        await asyncio.sleep(0.02)
    clock.advance(901)
    await client.app[WAITING].step()
    assert (await state_of(client, queued["session_id"]))["state"] == "running"


async def test_a_created_session_has_no_claim_deadline(make_sim, clock):
    client = await make_sim(claim_timeout=900)
    _, body = await post(client, "ann")
    clock.advance(901)
    await client.app[WAITING].step()
    assert (await state_of(client, body["session_id"]))["state"] == "running"


async def test_budget_caps_the_ttl_then_refuses(make_sim, clock):
    client = await make_sim()
    resp = await client.put("/users/ann/limits", json={"gpu_hours_per_week": 0.1})
    assert resp.status == 200
    assert (await resp.json())["budget_source"] == "user"
    # a 1g slice is 1/7 of a GPU: 0.1 GPU-hours last 42 minutes
    status, body = await post(client, "ann", ttl_minutes=60)
    assert status == 201
    assert (body["ttl_seconds"], body["ttl_capped"]) == (42 * 60, True)
    assert body["ttl_capped_by"] == "gpu_hours_per_week"
    resp = await client.patch(f"/sessions/{body['session_id']}", json={"extend_minutes": 10})
    assert (resp.status, (await resp.json())["code"]) == (403, "quota_exceeded")
    clock.advance(42 * 60)
    await client.delete(f"/sessions/{body['session_id']}")

    usage = await (await client.get("/users/ann/usage")).json()
    assert usage["gpu_hours_used"] == pytest.approx(0.1, abs=1e-3)
    assert usage["next_available_at"] is not None
    status, refusal = await post(client, "ann")
    assert (status, refusal["code"]) == (403, "quota_exceeded")
    assert refusal["gpu_hours_budget"] == 0.1
    assert refusal["gpu_hours_used"] == pytest.approx(0.1, abs=1e-3)
    assert refusal["next_available_at"] == usage["next_available_at"]
    status, refusal = await post(client, "ann", wait=True)  # never queued
    assert status == 403
    assert len(await events(client, "quota_exceeded")) == 3  # the PATCH's too
    status, other = await post(client, "bob", ttl_minutes=60)  # others untouched
    assert (status, other["ttl_capped"]) == (201, False)
    # back to the default (unlimited)
    resp = await client.put("/users/ann/limits", json={"gpu_hours_per_week": None})
    assert (await resp.json())["gpu_hours_budget"] is None


async def test_default_budget_applies_to_everyone(make_sim):
    client = await make_sim(gpu_hours_per_week=1 / 7)  # an hour of a 1g slice
    status, body = await post(client, "ann", ttl_minutes=120)
    assert (status, body["ttl_seconds"]) == (201, 3600)
    usage = await (await client.get("/users/ann/usage")).json()
    assert usage["budget_source"] == "default"


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--queue-timeout", "0"),
        ("--claim-timeout", "0s"),
        ("--fairshare-half-life", "0d"),
        ("--max-queued-per-user", "-1"),
        ("--gpu-hours-per-week", "-2"),
        ("--queue-timeout", "soon"),
    ],
)
def test_bad_fair_sharing_settings_are_refused(flag, value):
    with pytest.raises(ValueError):
        config_from_args(parse(["serve", flag, value], env={}), {})


def test_fair_sharing_defaults():
    config = config_from_args(parse(["serve"], env={}), {})
    assert (config.queue_timeout, config.claim_timeout) == (7200, 900)
    assert (config.fairshare_half_life, config.max_queued_per_user) == (7 * 86400, 1)
    assert config.gpu_hours_per_week is None  # 0: unlimited


@pytest.mark.parametrize(
    "body",
    [{}, {"gpu_hours_per_week": -1}, {"gpu_hours_per_week": "9"}, {"gpu_hours_per_week": 1e9}],
)
async def test_bad_limits_are_refused(make_sim, body):
    client = await make_sim()
    resp = await client.put("/users/ann/limits", json=body)
    assert (resp.status, (await resp.json())["code"]) == (400, "invalid_request")


async def test_restart_keeps_the_queue_in_order(make_sim):
    client = await make_sim()
    ids = await fill(client)
    _, first = await post(client, "late1", wait=True)
    _, second = await post(client, "late2", wait=True)
    await client.close()

    client = await make_sim()
    assert (await state_of(client, first["session_id"]))["queue_position"] == 1
    assert (await state_of(client, second["session_id"]))["queue_position"] == 2
    await client.delete(f"/sessions/{ids[0]}")
    await running(client, first["session_id"])
    assert (await state_of(client, second["session_id"]))["queue_position"] == 1


async def test_a_dequeued_start_that_fails_goes_back_and_starts_with_its_credentials(
    make_sim, runtime
):
    client = await make_sim()
    ids = await fill(client)
    _, first = await post(client, "late", wait=True)
    _, second = await post(client, "later", wait=True, ttl_minutes=120)  # never backfills
    gate = await start_held(client, runtime, ids[0])
    assert (await state_of(client, first["session_id"]))["state"] == "starting"
    assert (await state_of(client, second["session_id"]))["queue_position"] == 1
    runtime.mode = "fail_create"
    retry = runtime.pause("create")
    gate.open()
    await reached(retry)  # it failed, went back ahead of `second`, and starts again
    [requeued] = await events(client, "session_requeued")
    assert requeued["session_id"] == first["session_id"]
    assert (requeued["attempt"], requeued["error"]) == (1, "container_start_failed")
    runtime.mode = "ok"
    retry.open()
    view = await running(client, first["session_id"])
    assert_got_credentials(runtime, view, first)
    assert (await state_of(client, second["session_id"]))["queue_position"] == 1
    assert len(await events(client, "session_dequeued")) == 1


async def test_a_request_whose_starts_keep_failing_ends_audited(make_sim, runtime):
    client = await make_sim()
    ids = await fill(client)
    _, queued = await post(client, "late", wait=True)
    runtime.mode = "fail_create"
    await client.delete(f"/sessions/{ids[0]}")
    [failed] = await until(lambda: events(client, "session_dequeue_failed"), "the last try")
    assert (failed["error"], failed["attempts"]) == ("container_start_failed", MAX_START_ATTEMPTS)
    assert [e["attempt"] for e in await events(client, "session_requeued")] == [2, 1]
    assert await state_of(client, queued["session_id"]) is None
    assert (await (await client.get("/queue")).json())["count"] == 0


async def test_delete_while_a_dequeued_request_starts_ends_it_for_good(make_sim, runtime):
    client = await make_sim()
    ids = await fill(client)
    _, queued = await post(client, "late", wait=True)
    gate = await start_held(client, runtime, ids[0])
    resp = await client.delete(f"/sessions/{queued['session_id']}")
    assert resp.status == 200, await resp.json()
    gate.open()
    await client.app[WAITING].step()
    assert await state_of(client, queued["session_id"]) is None
    [withdrawn] = await events(client, "session_queue_withdrawn")
    assert (withdrawn["session_id"], withdrawn["reason"]) == (
        queued["session_id"],
        "session_deleted",
    )
    assert await events(client, "session_requeued") == []
    status, _ = await post(client, "late", wait=True)  # its place on the list is free
    assert status == 201  # and so is the slice


async def test_no_node_for_a_dequeued_start_keeps_it_waiting_uncounted(make_sim, runtime, clock):
    client = await make_sim()
    ids = await fill(client)
    _, queued = await post(client, "late", wait=True)
    waiting = client.app[WAITING]
    runtime.mode = "no_capacity"  # a Swarm whose nodes take no task
    await client.delete(f"/sessions/{ids[0]}")

    async def back():
        view = await state_of(client, queued["session_id"])
        return view["state"] == "queued" and not waiting.starting

    await until(back, "back on the list")
    gate = runtime.pause("create")
    await waiting.step()  # nothing freed, not yet due: not tried again
    assert (await state_of(client, queued["session_id"]))["queue_position"] == 1
    clock.advance(NO_CAPACITY_RETRY_SECONDS)
    await waiting.step()  # due
    assert (await state_of(client, queued["session_id"]))["state"] == "starting"
    gate.open()
    await until(back, "back on the list again")
    assert (await client.app[STORE].get_queued(queued["session_id"])).attempts == 0
    runtime.mode = "ok"
    await client.delete(f"/sessions/{ids[1]}")  # capacity frees: tried at once
    view = await running(client, queued["session_id"])
    assert_got_credentials(runtime, view, queued)
    assert await events(client, "session_requeued") == []


async def test_a_wait_request_no_node_takes_is_queued(make_sim, runtime):
    client = await make_sim()
    runtime.mode = "no_capacity"
    status, queued = await post(client, "ann", wait=True)
    assert (status, queued["state"], queued["queue_position"]) == (202, "queued", 1)
    status, refused = await post(client, "bob")  # without wait: as before
    assert (status, refused["code"]) == (503, "no_capacity")


async def test_a_start_the_gateway_stops_mid_way_goes_back_on_the_list(make_sim, runtime):
    client = await make_sim()
    ids = await fill(client)
    _, queued = await post(client, "late", wait=True)
    await start_held(client, runtime, ids[0])
    await client.close()  # as on SIGTERM: the start is cancelled and rolled back
    runtime.gates.clear()

    client = await make_sim()
    view = await running(client, queued["session_id"])
    assert_got_credentials(runtime, view, queued)
    [requeued] = await events(client, "session_requeued")
    assert (requeued["attempt"], requeued["error"]) == (1, "gateway_stopping")


async def test_a_start_a_crash_cut_off_goes_back_on_the_list(make_sim, runtime, tmp_path):
    client = await make_sim()
    ids = await fill(client)
    _, queued = await post(client, "late", wait=True)
    await client.close()
    # what a SIGKILL mid-start leaves: the session row stored, the request marked starting
    async with await Store.open(tmp_path / "state" / "sessions.db") as store:
        [request] = await store.queued()
        now = request.submitted_at
        user = await store.ensure_user("late", now)
        starting = a_session(
            now,
            id=request.id,
            user_id="late",
            uid=user.uid,
            ssh_port=UNIT_PORT_BASE + 19,
            image="gpu-workspace:latest",
            workspace=str(tmp_path / "workspaces" / "late"),
            authorized_keys=request.authorized_keys,
        )
        await store.insert_session(starting, from_queue=True)
        assert await store.queued() == []

    client = await make_sim()  # recovery ends the row as a failed create: the request is back
    view = await state_of(client, queued["session_id"])
    assert (view["state"], view["queue_position"]) == ("queued", 1)
    [requeued] = await events(client, "session_requeued")
    assert (requeued["attempt"], requeued["error"]) == (1, "start_interrupted")
    await client.delete(f"/sessions/{ids[0]}")
    view = await running(client, queued["session_id"])
    assert_got_credentials(runtime, view, queued)

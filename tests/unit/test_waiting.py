"""The waiting list and GPU-hour budgets through the API, on a simulated A100 with dynamic
MIG (seven 1g slices), the fake runtime and a settable clock."""

import asyncio
import json

import bcrypt
import pytest
from cryptography.hazmat.primitives import serialization

from gateway.api.keys import SESSIONS, WAITING
from gateway.config import config_from_args, parse
from gateway.gpu.sim import SimBackend
from gateway.session_files import AUTHORIZED_KEYS_DIR, PASSWORD_HASH
from tests.unit.helpers import CLIENT_KEX

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
    # the container got the 202's key and password (their public halves)
    container = runtime.containers[view["container_id"]]
    key = serialization.load_ssh_private_key(queued["ssh_private_key"].encode(), None)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    assert public.split()[1] in container.files[f"{AUTHORIZED_KEYS_DIR}/late"]
    stored_hash = container.files[PASSWORD_HASH].strip()
    assert bcrypt.checkpw(queued["ssh_password"].encode(), stored_hash)
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

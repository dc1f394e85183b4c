"""A session whose Swarm task is restarted or moved keeps its GPU facts true: the sweep (and
a restart's recovery) takes in the new task, records and audits its slice and node, and
ends the session as ``gpu_pin_lost`` when the new task sees another device."""

from gateway.api import keys
from tests.unit.helpers import create
from tests.unit.test_lifecycle import audit_events

SLICE = "MIG-node-slice-1"
OTHER = "MIG-node-slice-2"


async def _mig_session(make_client, runtime):
    runtime.swarm_tasks = True
    runtime.engine_slices = {"1g.10gb": SLICE}
    client = await make_client(runtime="swarm")
    created = await create(client, mig_profile="1g.10gb")
    assert created.status == 201, await created.text()
    body = await created.json()
    assert body["gpu_uuid"] == SLICE and len(runtime.gpu_checks) == 1
    return client, body


async def _replaced(client) -> list[dict]:
    return [e for e in await audit_events(client) if e["event"] == "session_task_replaced"]


async def test_a_replaced_task_holding_another_slice_is_recorded_audited_and_checked(
    make_client, runtime
):
    client, body = await _mig_session(make_client, runtime)
    sid, container = body["session_id"], body["container_id"]
    assert await client.app[keys.SESSIONS].sweep() == 0
    assert await _replaced(client) == [] and len(runtime.gpu_checks) == 1  # same task

    runtime.engine_slices = {"1g.10gb": OTHER}  # the node's other slice of the profile
    runtime.replace_task(container)
    assert await client.app[keys.SESSIONS].sweep() == 0
    view = await (await client.get(f"/sessions/{sid}")).json()
    assert (view["state"], view["gpu_uuid"]) == ("running", OTHER)
    assert len(runtime.gpu_checks) == 2  # the new task's pin, checked
    (event,) = await _replaced(client)
    assert event["session_id"] == sid
    assert (event["previous_task"], event["task"]) == (f"task-{container}-0", f"task-{container}-1")
    assert (event["previous_gpu_uuid"], event["gpu_uuid"]) == (SLICE, OTHER)
    assert event["gpu_problem"] is None
    assert await client.app[keys.SESSIONS].sweep() == 0  # once per task
    assert len(await _replaced(client)) == 1 and len(runtime.gpu_checks) == 2


async def test_a_replaced_task_seeing_another_device_ends_the_session(make_client, runtime):
    client, body = await _mig_session(make_client, runtime)
    runtime.seen_gpus = ("GPU-node-parent", OTHER)  # the new node's toolkit ignores the pin
    runtime.replace_task(body["container_id"])
    assert await client.app[keys.SESSIONS].sweep() == 1
    assert await (await client.get("/sessions")).json() == []
    assert body["container_id"] in runtime.removed
    events = await audit_events(client)
    (replaced,) = [e for e in events if e["event"] == "session_task_replaced"]
    assert replaced["gpu_problem"] == (
        f"the container sees GPU-node-parent, {OTHER} instead of only {SLICE}"
    )
    (ended,) = [e for e in events if e["event"] == "session_ended"]
    assert ended["reason"] == "gpu_pin_lost"


async def test_a_replaced_task_not_answering_yet_is_checked_at_the_next_sweep(make_client, runtime):
    client, body = await _mig_session(make_client, runtime)
    runtime.replace_task(body["container_id"])
    runtime.failing.add("visible_gpus")  # its sshd does not answer yet
    assert await client.app[keys.SESSIONS].sweep() == 0
    assert await _replaced(client) == []
    runtime.failing.clear()
    runtime.seen_gpus = ("GPU-node-parent", OTHER)
    assert await client.app[keys.SESSIONS].sweep() == 1  # checked now, and wrong


async def test_a_gpu_less_replaced_task_is_audited_only(make_client, runtime):
    runtime.swarm_tasks = True
    client = await make_client(runtime="swarm")
    body = await (await create(client)).json()
    runtime.replace_task(body["container_id"])
    assert await client.app[keys.SESSIONS].sweep() == 0
    (event,) = await _replaced(client)
    assert event["gpu_uuid"] is None and event["task"].endswith("-1")
    assert runtime.gpu_checks == []
    view = await (await client.get(f"/sessions/{body['session_id']}")).json()
    assert view["state"] == "running"


async def test_a_task_replaced_while_the_gateway_was_down_is_checked_at_recovery(
    make_client, runtime
):
    client, body = await _mig_session(make_client, runtime)
    await client.close()
    client = await make_client(runtime="swarm")  # the same task: checked, nothing audited
    assert len(runtime.gpu_checks) == 2 and await _replaced(client) == []
    assert await client.app[keys.SESSIONS].sweep() == 0
    assert len(runtime.gpu_checks) == 2
    await client.close()

    runtime.engine_slices = {"1g.10gb": OTHER}
    runtime.replace_task(body["container_id"])
    client = await make_client(runtime="swarm")
    view = await (await client.get(f"/sessions/{body['session_id']}")).json()
    assert (view["state"], view["gpu_uuid"]) == ("running", OTHER)
    (event,) = await _replaced(client)
    assert (event["previous_task"], event["previous_gpu_uuid"]) == (None, SLICE)
    assert len(runtime.gpu_checks) == 3
    await client.close()

    runtime.seen_gpus = ("GPU-node-parent", SLICE)  # replaced again, onto the wrong device
    runtime.replace_task(body["container_id"])
    client = await make_client(runtime="swarm")
    assert await (await client.get("/sessions")).json() == []
    (ended,) = [e for e in await audit_events(client) if e["event"] == "session_ended"]
    assert ended["reason"] == "gpu_pin_lost"

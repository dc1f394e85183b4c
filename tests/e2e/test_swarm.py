"""``--runtime swarm`` on a real single-node Swarm: this engine, made a manager if it is not
one yet (and left so: other tests' plain containers and networks are unaffected).

A session is a service; the user logs in through the gateway and writes to the workspace;
a PATCH leaves the service as it is (an update would replace the task); Swarm replaces the
task (``docker service update --force``) and the user logs in again, with no gateway
restart, and finds the PATCHed session facts (the sweep audits the new task); DELETE leaves
no service, secret or config behind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import Gateway, docker, wait_for
from tests.e2e.swarm import owned, remove_swarm_leftovers, set_availability, swarm_manager


@pytest.fixture
def swarm_gateway(gateway_factory: Any) -> Iterator[Gateway]:
    with swarm_manager():
        gw = gateway_factory("--runtime", "swarm", "--reap-interval", "1", "--place-timeout", "2s")
        instance = gw.instance_id()
        yield gw
        gw.stop()
        remove_swarm_leftovers(gw, instance)


def running_task(service: str) -> str:
    """The id of the service's task that runs now ('' while none does)."""
    lines = docker(
        "service", "ps", service, "-q", "--filter", "desired-state=running", "--no-trunc"
    ).split()
    for task in lines:
        state = docker("inspect", task, "--format", "{{.Status.State}}")
        if state == "running":
            return task
    return ""


def test_swarm_session_survives_a_replaced_task_and_leaves_nothing(swarm_gateway, ssh):
    gw = swarm_gateway
    created = gw.create(user_id="swarmuser")
    assert created.status == 201, created.body
    session = created.body
    service = session["container_id"]
    instance = gw.instance_id()
    assert owned("service", instance) == [service]
    version = docker("service", "inspect", service, "-f", "{{.Version.Index}}")
    nodes = gw.request("GET", "/nodes").body["nodes"]
    (own,) = [n for n in nodes if n["gateway"]]
    assert (own["role"], own["state"], own["availability"]) == ("manager", "ready", "active")

    done = ssh.with_key(session, "echo from-swarm > ~/note.txt; grep NoNewPrivs /proc/1/status")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["NoNewPrivs:", "1"]
    assert (gw.workspaces / "swarmuser" / "note.txt").read_text() == "from-swarm\n"

    url = f"/sessions/{session['session_id']}"
    patched = gw.request("PATCH", url, {"extend_minutes": 30})
    assert patched.status == 200, patched.body
    assert docker("service", "inspect", service, "-f", "{{.Version.Index}}") == version

    first = running_task(service)
    docker("service", "update", "--force", "--detach", "--quiet", service)
    wait_for(lambda: running_task(service) not in ("", first), timeout=30, what="a replaced task")
    again = ssh.with_key(session, "cat ~/note.txt; cat /etc/sandman/session.json")
    assert again.returncode == 0, again.stderr
    note, facts = again.stdout.split("\n", 1)
    assert note == "from-swarm"
    # the new task got its files again, the PATCHed facts included
    assert json.loads(facts)["expires_at"] == patched.body["expires_at"]
    view = gw.request("GET", url).body
    assert (view["state"], view["node"]) == ("running", own["hostname"])
    # the sweep took the new task in: audited, old and new (a GPU-less one: nothing to check)
    audit = f"/audit?session_id={session['session_id']}"

    def replaced() -> list[dict[str, Any]]:
        events = gw.request("GET", audit).body["events"]
        return [e for e in events if e["event"] == "session_task_replaced"]

    wait_for(replaced, timeout=10, what="the replacement in the audit")
    (event,) = replaced()
    assert (event["previous_task"], event["task"]) == (first, running_task(service))
    assert (event["node"], event["gpu_uuid"]) == (own["hostname"], None)

    deleted = gw.request("DELETE", url)
    assert deleted.status in (200, 204)
    assert (owned("service", instance), owned("secret", instance), owned("config", instance)) == (
        [],
        [],
        [],
    )


def test_a_service_removed_behind_the_gateways_back_ends_as_backend_gone(swarm_gateway, ssh):
    gw = swarm_gateway
    session = gw.create(user_id="swarmgone").body
    assert ssh.with_key(session, "true").returncode == 0
    docker("service", "rm", session["container_id"])
    url = f"/sessions/{session['session_id']}"
    wait_for(lambda: gw.request("GET", url).status == 404, timeout=10, what="the cleanup")
    events = gw.request("GET", f"/audit?session_id={session['session_id']}").body["events"]
    (ended,) = [e for e in events if e["event"] == "session_ended"]
    assert (ended["event"], ended["reason"]) == ("session_ended", "backend_gone")
    assert (owned("secret", gw.instance_id()), owned("config", gw.instance_id())) == ([], [])


def test_a_session_no_node_can_take_is_503_no_capacity_in_time(swarm_gateway):
    """With this (only) node paused, the task waits for a node: the create ends at
    --place-timeout (2 s here) with the engine's reason, and leaves nothing behind."""
    gw = swarm_gateway
    set_availability("pause")
    try:
        began = time.monotonic()
        refused = gw.create(user_id="nocapacity")
        waited = time.monotonic() - began
    finally:
        set_availability("active")
    assert (refused.status, refused.body["code"]) == (503, "no_capacity")
    assert "no suitable node" in refused.body["error"]
    assert waited < 10
    instance = gw.instance_id()
    assert (owned("service", instance), owned("secret", instance)) == ([], [])
    assert gw.request("GET", "/sessions").body == []


def test_a_wait_request_no_node_can_take_is_queued_and_can_be_withdrawn(swarm_gateway):
    """no_capacity is "nothing fits" for ``wait``: a 202, and the request stays queued (it
    is not tried again at once: no capacity freed) until it is withdrawn."""
    gw = swarm_gateway
    set_availability("pause")
    try:
        queued = gw.create(user_id="waitswarm", wait=True)
        assert queued.status == 202, queued.body
        url = f"/sessions/{queued.body['session_id']}"
        time.sleep(1)  # a step runs after the 202: it leaves the request waiting
        view = gw.request("GET", url).body
        assert (view["state"], view["queue_position"]) == ("queued", 1), view
        withdrawn = gw.request("DELETE", url)
    finally:
        set_availability("active")
    assert withdrawn.body["message"] == f"queued request {queued.body['session_id']} withdrawn"
    instance = gw.instance_id()
    assert (owned("service", instance), owned("secret", instance)) == ([], [])


def test_a_node_without_the_shared_workspace_root_refuses_to_run_sessions(gateway_factory):
    """--shared-workspaces: a task whose node's workspace root is not the gateway's (here:
    the sentinel's token changed behind the gateway's back) never starts on an empty home."""
    with swarm_manager():
        gw = gateway_factory("--runtime", "swarm", "--shared-workspaces")
        instance = gw.instance_id()
        try:
            (gw.workspaces / ".sandman-shared").write_text("another-share\n")
            refused = gw.create(user_id="elsewhere")
            assert (refused.status, refused.body["code"]) == (502, "container_start_failed")
            assert "exit" in refused.body["error"]  # before its SSH server started, or (65)
            assert "not the gateway's shared one" in gw.log_path.read_text()  # the task's log
            assert owned("service", instance) == []
        finally:
            gw.stop()
            remove_swarm_leftovers(gw, instance)

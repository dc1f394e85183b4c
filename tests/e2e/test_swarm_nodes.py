"""``--runtime swarm`` across real nodes: a nested worker (dockerd in a container on this
engine's docker0, built offline: ``make images``) joins this engine's Swarm.

With ``--shared-workspaces`` (the workspace root bound at the same path in the worker, as
shared storage would be) a session lands on the worker while the manager takes no new
tasks; the user logs in through the gateway, which finds the task at the worker's address,
and the file reaches the shared workspace; a PATCH's new facts reach the task, and idle
reclaim reads its CPU time, through the gateway's control channel; so it reads a GPU
session's slice on the worker (``nvidia-smi`` in the task): with no GPU process and nobody
connected it is reclaimed, while a GPU job runs it is kept. ``GET /nodes`` shows the
worker's GPU slice (a node generic resource). When the worker's engine dies and no other
node may take the task, the session ends as ``backend_gone`` and its port closes.

A session asking for a MIG profile reserves one slice of it: Swarm places it on the worker
offering that slice (though this node takes tasks too), the task's sshd runs pinned to the
slice's UUID, the row records it, a second request finds none free (503 ``no_capacity``
with the engine's reason), the expiry warning reaches the user's terminal on the worker
(through the control channel), and once the first session's TTL ends the slice serves another.
The worker's engine runs a fake NVIDIA toolkit (``swarm_node_nvidia.sh``): the gateway's pin
check asks the task on the worker, through the control channel, what ``nvidia-smi -L``
lists; a task that sees another device than its slice fails the create and is rolled back,
and a task Swarm replaces with one that sees another device ends its session as
``gpu_pin_lost``, freeing the slice.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from tests.e2e.conftest import IMAGE, Gateway, docker, port_refuses, wait_for
from tests.e2e.swarm import (
    Worker,
    owned,
    remove_swarm_leftovers,
    set_availability,
    swarm_manager,
    swarm_worker,
)
from tests.e2e.test_idle import SHORT, events, gone, stays

SLICE = "MIG-1g.10gb=MIG-e2e00000-0000-0000-0000-000000000001"
SLICE_UUID = SLICE.split("=")[1]
OTHER_UUID = "MIG-e2e00000-0000-0000-0000-000000000002"  # a device not given to the session


@contextlib.contextmanager
def _gateway_and_worker(gateway_factory: Any, *options: str) -> Iterator[tuple[Gateway, Worker]]:
    """A Swarm gateway with shared workspaces (and ``options``), and a nested worker
    offering :data:`SLICE`; this node active again, and everything they made removed,
    afterwards."""
    gw = gateway_factory("--runtime", "swarm", "--shared-workspaces", "--place-timeout", "3s",
                         "--reap-interval", "1", *options, start=False)  # fmt: skip
    gw.workspaces.mkdir(parents=True)
    with swarm_manager(), swarm_worker(gw.workspaces, IMAGE, [SLICE]) as worker:
        # the session network's config-only half, which every node needs
        worker.docker("network", "create", "--config-only",
                      "-o", "com.docker.network.bridge.enable_icc=false",
                      f"{gw.network}-config")  # fmt: skip
        gw.start()
        instance = gw.instance_id()
        try:
            yield gw, worker
        finally:
            set_availability("active")
            gw.stop()
            remove_swarm_leftovers(gw, instance)


#: short idle clocks (test_idle's); the control channel's own login each second costs the
#: task CPU (8 % of a core measured; well under 1 % at the default 60 s): a higher threshold
IDLE = (*SHORT, "--idle-cpu-threshold", "50")


def test_a_session_on_a_nested_worker_ends_when_the_worker_is_lost(gateway_factory: Any, ssh):
    with _gateway_and_worker(gateway_factory, *IDLE) as (gw, worker):
        nodes = {n["hostname"]: n for n in gw.request("GET", "/nodes").body["nodes"]}
        kind, value = SLICE.split("=")
        assert nodes[worker.name]["role"] == "worker"
        assert nodes[worker.name]["resources"] == [{"kind": kind, "value": value}]
        assert nodes[worker.name]["address"] == worker.address

        set_availability("pause")  # this node takes no new task: the worker must
        created = gw.create(user_id="nested", idle_reclaim=False)  # this flow takes its time
        assert created.status == 201, created.body
        session = created.body
        where = docker("service", "ps", session["container_id"], "--format", "{{.Node}}",
                       "--filter", "desired-state=running")  # fmt: skip
        assert where == worker.name
        url = f"/sessions/{session['session_id']}"
        assert gw.request("GET", url).body["node"] == worker.name  # the view names it
        # a PATCH reaches the task on the worker through the control channel (the
        # manager's Engine cannot exec there), and never updates the service
        patched = gw.request("PATCH", url, {"extend_minutes": 45})
        assert patched.status == 200, patched.body
        facts = ssh.with_key(session, "cat /etc/sandman/session.json")
        assert json.loads(facts.stdout)["expires_at"] == patched.body["expires_at"]
        done = ssh.with_key(session, "echo from-worker > ~/w.txt")
        assert done.returncode == 0, done.stderr
        assert (gw.workspaces / "nested" / "w.txt").read_text() == "from-worker\n"
        # idle reclaim reads the task's CPU time on the worker through the control channel
        wait_for(lambda: gw.request("GET", url).body["idle"]["utilization"] is not None,
                 timeout=15, what="a CPU reading from the worker")  # fmt: skip
        _gpu_sessions_on_the_worker_are_reclaimed_when_idle(gw, ssh)

        docker("kill", worker.name)  # its engine dies; no other node may take the task
        wait_for(lambda: gw.request("GET", url).status == 404, timeout=60, what="the end")
        events = gw.request("GET", f"/audit?session_id={session['session_id']}").body
        (ended,) = [e for e in events["events"] if e["event"] == "session_ended"]
        assert ended["reason"] == "backend_gone"
        assert port_refuses(session["ssh_port"])


def _gpu_sessions_on_the_worker_are_reclaimed_when_idle(gw: Gateway, ssh: Any) -> None:
    """The manager has no NVML: idle reclaim reads a GPU session's slice through the control
    channel, from ``nvidia-smi`` in the task (the fake toolkit's). No connection and no GPU
    process: reclaimed as idle. A GPU job running: kept until it ends."""
    unused = gw.create(user_id="gpuidle", mig_profile="1g.10gb")
    assert unused.status == 201, unused.body
    wait_for(lambda: gone(gw, unused.body), timeout=40, what="the idle reclaim")
    trail = events(gw, unused.body)
    assert trail.index("session_idle_warning") < trail.index("session_idle_reclaimed")

    working = gw.create(user_id="gpubusy", mig_profile="1g.10gb")
    assert working.status == 201, working.body
    session = working.body
    started = ssh.with_key(session, "touch /tmp/sandman-fake-gpu-app")  # a job; the user leaves
    assert started.returncode == 0, started.stderr
    view = stays(gw, session, 8)  # twice the idle clocks
    assert view["kept_because"] == ["compute_busy"] and view["utilization"] is None
    assert view["no_connection_since"] is not None
    ended = ssh.with_key(session, "rm /tmp/sandman-fake-gpu-app")  # the job ends
    assert ended.returncode == 0, ended.stderr
    wait_for(lambda: gone(gw, session), timeout=40, what="the idle reclaim after the job")


def test_a_mig_session_lands_on_the_node_with_the_slice_and_frees_it_at_ttl(
    gateway_factory: Any, ssh
):
    with _gateway_and_worker(gateway_factory, "--expiry-warning", "9s") as (gw, worker):
        # the worker's toolkit exposes another device than the slice Swarm assigned: the
        # pin check in the task (on the worker: the manager's Engine cannot exec there)
        # fails the create, and the rollback removes the service and frees the slice
        worker.expose_gpus(OTHER_UUID)
        failed = gw.create(user_id="migbad", mig_profile="1g.10gb")
        assert (failed.status, failed.body["code"]) == (502, "container_start_failed")
        assert (
            f"GPU isolation failed: the container sees GPU-e2e-parent, {OTHER_UUID} instead of "
            f"only {SLICE_UUID}" in failed.body["error"]
        )
        instance = gw.instance_id()
        assert owned("service", instance) == owned("secret", instance) == []
        worker.expose_gpus()

        created = gw.create(user_id="migone", mig_profile="1g.10gb", ttl_seconds=15)
        assert created.status == 201, created.body
        session = created.body
        assert session["gpu_uuid"] == SLICE_UUID and session["mig_profile"] == "1g.10gb"
        url = f"/sessions/{session['session_id']}"
        assert gw.request("GET", url).body["node"] == worker.name  # this node has none
        # the task runs pinned to its slice, sees only it, and the user's login sees which
        logged_in = ssh.with_key(session, "echo $NVIDIA_VISIBLE_DEVICES; nvidia-smi -L")
        assert logged_in.returncode == 0, logged_in.stderr
        pinned, listing = logged_in.stdout.split("\n", 1)
        assert pinned == SLICE_UUID and f"(UUID: {SLICE_UUID})" in listing
        # the expiry warning reaches its terminal through the control channel (the
        # manager's Engine cannot exec on the worker)
        terminal = ssh.start_with_key(session, "sleep 30", tty=True)

        refused = gw.create(user_id="migtwo", mig_profile="1g.10gb")
        assert refused.status == 503 and refused.body["code"] == "no_capacity", refused.body
        assert "insufficient resources" in refused.body["error"]

        wait_for(lambda: gw.request("GET", url).status == 404, timeout=40, what="the TTL")
        shown, _ = terminal.communicate(timeout=30)
        assert "Sandman: this session ends in" in shown
        events = gw.request("GET", f"/audit?session_id={session['session_id']}").body
        assert [e for e in events["events"] if e["event"] == "session_expired"]
        again = gw.create(user_id="migtwo", mig_profile="1g.10gb")
        assert again.status == 201, again.body
        assert again.body["gpu_uuid"] == SLICE_UUID

        # Swarm replaces the task (forced here; a node reboot or a task that died alike) and
        # the new one sees another device: the sweep checks it and ends the session
        worker.expose_gpus(OTHER_UUID)
        docker("service", "update", "--force", "--detach", "--quiet", again.body["container_id"])
        url = f"/sessions/{again.body['session_id']}"
        wait_for(lambda: gw.request("GET", url).status == 404, timeout=30, what="the check")
        events = gw.request("GET", f"/audit?session_id={again.body['session_id']}").body
        (replaced,) = [e for e in events["events"] if e["event"] == "session_task_replaced"]
        assert f"sees GPU-e2e-parent, {OTHER_UUID} instead of only" in replaced["gpu_problem"]
        assert (replaced["node"], replaced["gpu_uuid"]) == (worker.name, SLICE_UUID)
        (ended,) = [e for e in events["events"] if e["event"] == "session_ended"]
        assert ended["reason"] == "gpu_pin_lost"
        assert owned("service", instance) == []  # its end waited for the task: slice free
        worker.expose_gpus()
        third = gw.create(user_id="migthree", mig_profile="1g.10gb")
        assert third.status == 201 and third.body["gpu_uuid"] == SLICE_UUID, third.body
        assert gw.request("DELETE", f"/sessions/{third.body['session_id']}").status == 200

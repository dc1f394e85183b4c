"""The Swarm runtime's pure parts (``swarm_spec``, ``swarm_tasks``): the service it asks for,
where a task answers, when Swarm still means to run one, what a node offers; the options;
``GET /nodes`` (the engine itself is in tests/e2e)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.config import Config, config_from_args, parse
from gateway.runtime.base import SSHD_CAPABILITIES, ContainerFile, ContainerSpec
from gateway.runtime.swarm_spec import (
    FILES_ROOT,
    IMAGE_ENTRYPOINT,
    SHARED_SENTINEL_TARGET,
    Placement,
    file_object_name,
    file_reference,
    is_secret,
    service_spec,
)
from gateway.runtime.swarm_tasks import (
    assigned_slice,
    node_info,
    parse_time,
    stopping,
    stranded,
    task_address,
    unplaced_reason,
    wants_to_run,
)
from gateway.session_files import AUTHORIZED_KEYS_DIR, expiring_files
from tests.unit.helpers import a_session

SPEC = ContainerSpec(
    name="sandman-alice-12345678",
    image="gpu-workspace",
    hostname="alice-12345678",
    env={"SANDMAN_USER": "alice"},
    labels={"sandman.session_id": "s1", "sandman.instance": "i1"},
    workspace=Path("/srv/workspaces/alice"),
    home="/home/alice",
    network="worknet",
    pids_limit=512,
    cap_add=SSHD_CAPABILITIES,
    cpu_limit=1.5,
    memory_limit=2**30,
)
KEY = ContainerFile("/etc/ssh/ssh_host_ed25519_key", b"private", 0o600)
FACTS = ContainerFile("/etc/sandman/session.json", b"{}")


def test_service_keeps_the_containers_confinement_and_runs_the_entrypoint_without_new_privs():
    body = service_spec(SPEC, [file_reference(KEY, "sec1", "n1")], Placement(node_id="node1"))
    template = body["task_template"]
    container = template["ContainerSpec"]
    assert body["name"] == SPEC.name and body["labels"] == SPEC.labels
    assert container["CapabilityDrop"] == ["ALL"]
    assert container["CapabilityAdd"] == list(SSHD_CAPABILITIES)
    assert container["Mounts"] == [
        {"Type": "bind", "Source": "/srv/workspaces/alice", "Target": "/home/alice"}
    ]
    assert container["Command"][-1] == IMAGE_ENTRYPOINT
    assert "setpriv --no-new-privs" in container["Command"][2]
    assert template["Resources"]["Limits"] == {
        "Pids": 512,
        "NanoCPUs": 1_500_000_000,
        "MemoryBytes": 2**30,
    }
    assert template["Placement"]["Constraints"] == ["node.id==node1"]
    assert template["Networks"] == [{"Target": "worknet"}]
    assert container["Secrets"][0]["SecretID"] == "sec1" and container["Configs"] == []
    ports = body["endpoint_spec"]["Ports"]
    assert ports == [{"Protocol": "tcp", "TargetPort": 22, "PublishMode": "host"}]


def test_no_limits_means_only_the_process_limit():
    spec = replace(SPEC, cpu_limit=None, memory_limit=None)
    body = service_spec(spec, [], Placement(node_id="n"))
    assert body["task_template"]["Resources"]["Limits"] == {"Pids": 512}


def test_shared_workspaces_place_anywhere_and_check_the_share():
    """With shared workspaces no node is pinned; the task mounts the root's sentinel and
    refuses to start where it does not hold the gateway's token."""
    placement = Placement(sentinel="/srv/workspaces/.sandman-shared", token="t0k")
    body = service_spec(SPEC, [], placement)
    container = body["task_template"]["ContainerSpec"]
    assert body["task_template"]["Placement"]["Constraints"] == []
    assert container["Env"]["SANDMAN_SHARED_TOKEN"] == "t0k"
    assert container["Mounts"][1] == {
        "Type": "bind",
        "Source": "/srv/workspaces/.sandman-shared",
        "Target": SHARED_SENTINEL_TARGET,
        "ReadOnly": True,
    }
    assert "SANDMAN_SHARED_TOKEN" not in SPEC.env  # the spec itself is left alone


@pytest.mark.parametrize(
    ("profile", "kind"),
    [("1g.10gb", "MIG-1g.10gb"), ("3g.40gb", "MIG-3g.40gb"), ("full", "NVIDIA-GPU")],
)
def test_a_gpu_slice_is_one_generic_resource_of_its_profiles_kind(profile, kind):
    """Swarm places the task on a node offering a free slice of that kind (the nodes
    offer them as named resources, ``MIG-1g.10gb=MIG-<uuid>``)."""
    body = service_spec(replace(SPEC, gpu_slice=profile), [], Placement(node_id="n"))
    reservations = body["task_template"]["Resources"]["Reservations"]
    assert reservations == {
        "GenericResources": [{"DiscreteResourceSpec": {"Kind": kind, "Value": 1}}]
    }


def test_no_gpu_slice_reserves_nothing():
    body = service_spec(SPEC, [], Placement(node_id="n"))
    assert "Reservations" not in body["task_template"]["Resources"]


@pytest.mark.parametrize(
    ("task", "uuid"),
    [
        (
            {
                "AssignedGenericResources": [
                    {"NamedResourceSpec": {"Kind": "MIG-1g.10gb", "Value": "MIG-a1"}}
                ]
            },
            "MIG-a1",
        ),
        (
            {"AssignedGenericResources": [{"DiscreteResourceSpec": {"Kind": "x", "Value": 2}}]},
            None,
        ),
        (
            {"GenericResources": [{"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": "GPU-b"}}]},
            "GPU-b",
        ),
        ({"AssignedGenericResources": None}, None),
        ({}, None),
    ],
)
def test_the_slice_swarm_assigned_a_task(task, uuid):
    assert assigned_slice(task) == uuid


@pytest.mark.parametrize(
    ("states", "holding"),
    [
        ([], False),  # all gone
        ([("running", "n1")], True),
        ([("shutdown", "n1"), ("failed", "n1"), ("complete", "n1")], False),
        ([("shutdown", "n1"), ("running", "n1")], True),
        ([("running", "down")], False),  # its node reports nothing until it returns
        ([("pending", None)], False),  # never placed
    ],
)
def test_a_removed_services_tasks_hold_resources_until_they_stop(states, holding):
    tasks = [{"Status": {"State": state}, "NodeID": node} for state, node in states]
    assert stopping(tasks, {"n1", "n2"}) is holding


@pytest.mark.parametrize(
    ("file", "secret"),
    [(KEY, True), (FACTS, False), (ContainerFile("/etc/sandman/password-hash", b"h", 0o600), True)],
)
def test_root_only_files_travel_as_secrets_and_land_under_the_files_root(file, secret):
    assert is_secret(file) is secret
    reference = file_reference(file, "id1", "name1")
    assert ("SecretID" in reference) is secret and ("ConfigID" in reference) is not secret
    assert reference["File"] == {
        "Name": FILES_ROOT + file.path,
        "UID": "0",
        "GID": "0",
        "Mode": file.mode,
    }


def test_object_names_are_stable_per_content_and_differ_otherwise():
    """A retried start finds the objects the first try made; changed content is a new one."""
    assert file_object_name("svc", KEY) == file_object_name("svc", KEY)
    changed = ContainerFile(KEY.path, b"other", KEY.mode)
    assert file_object_name("svc", changed) != file_object_name("svc", KEY)
    assert file_object_name("svc", KEY).startswith("svc.")


NODES = {"n1": "172.17.0.1", "n2": "172.17.0.3"}


def _task(state: str, node: str = "n1", port: int | None = 30001, desired: str = "running"):
    ports = [] if port is None else [{"TargetPort": 22, "PublishedPort": port}]
    return {
        "NodeID": node,
        "DesiredState": desired,
        "Status": {"State": state, "PortStatus": {"Ports": ports}},
    }


@pytest.mark.parametrize(
    ("task", "address"),
    [
        (_task("running"), ("172.17.0.1", 30001)),
        (_task("running", node="n2", port=30002), ("172.17.0.3", 30002)),
        (_task("starting"), None),
        (_task("running", port=None), None),  # no published port yet
        (_task("running", node="gone"), None),  # its node left (or is down)
        (_task("running", desired="shutdown"), None),  # being stopped: no new connections
    ],
)
def test_task_address(task, address):
    assert task_address(task, NODES) == address


@pytest.mark.parametrize(
    ("tasks", "alive"),
    [
        ([_task("running")], True),
        ([_task("shutdown", desired="shutdown"), _task("starting")], True),  # replaced
        ([_task("shutdown", desired="shutdown"), _task("pending", desired="ready")], True),
        ([_task("failed", desired="shutdown")] * 3, False),  # gave up
        ([], False),
    ],
)
def test_swarm_means_to_run_the_service(tasks, alive):
    assert wants_to_run(tasks) is alive


def test_runtime_option():
    assert config_from_args(parse(["serve"], env={}), {}).runtime == "docker"
    args = parse(["serve"], env={"SANDMAN_RUNTIME": "swarm"})
    assert config_from_args(args, {}).runtime == "swarm"
    with pytest.raises(ValueError, match="--runtime"):
        config_from_args(parse(["serve", "--runtime", "kubernetes"], env={}), {})
    with pytest.raises(ValueError, match="--shared-workspaces"):
        config_from_args(parse(["serve", "--shared-workspaces"], env={}), {})
    with pytest.raises(ValueError, match="--no-egress"):
        config_from_args(parse(["serve", "--runtime", "swarm", "--no-egress"], env={}), {})


WORKER = {
    "ID": "w1",
    "Description": {
        "Hostname": "gpu-node-1",
        "Engine": {"EngineVersion": "20.10.24"},
        "Resources": {
            "NanoCPUs": 16_000_000_000,
            "MemoryBytes": 2**37,
            "GenericResources": [
                {"NamedResourceSpec": {"Kind": "MIG-1g.10gb", "Value": "MIG-b"}},
                {"NamedResourceSpec": {"Kind": "MIG-1g.10gb", "Value": "MIG-a"}},
                {"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 2}},
            ],
        },
    },
    "Spec": {"Role": "worker", "Availability": "active"},
    "Status": {"State": "ready", "Addr": "172.17.0.3"},
}


def test_a_node_as_the_engine_describes_it():
    node = node_info(WORKER, gateway_node="m1")
    assert (node.id, node.hostname, node.role, node.state, node.availability) == (
        "w1",
        "gpu-node-1",
        "worker",
        "ready",
        "active",
    )
    assert (node.address, node.cpus, node.memory, node.gateway) == (
        "172.17.0.3",
        16.0,
        2**37,
        False,
    )
    assert node.resources == (
        ("MIG-1g.10gb", "MIG-a"),
        ("MIG-1g.10gb", "MIG-b"),
        ("NVIDIA-GPU", "2"),
    )
    assert node_info(WORKER, gateway_node="w1").gateway is True


def test_a_node_that_left_says_so_with_no_address():
    gone = {"ID": "w2", "Spec": {"Role": "worker"}, "Status": {"State": "down"}}
    node = node_info(gone, None)
    assert (node.state, node.address, node.resources, node.hostname) == ("down", None, (), "")


async def test_nodes_route_lists_what_the_runtime_reports(make_client):
    """And a session view names no node on this (plain Docker) host."""
    client = await make_client()
    created = await (await client.post("/sessions", json={"user_id": "ann"})).json()
    view = await (await client.get(f"/sessions/{created['session_id']}")).json()
    assert view["node"] is None
    body = await (await client.get("/nodes")).json()
    assert body["count"] == 1
    (node,) = body["nodes"]
    assert (node["hostname"], node["role"], node["gateway"], node["resources"]) == (
        "fakehost",
        "standalone",
        True,
        [],
    )


@pytest.mark.parametrize(
    ("runtime", "valid_until"),
    [("docker", "20261206110000Z"), ("swarm", "20261206120000Z")],
)
def test_with_swarm_the_keys_outlast_any_patch(runtime, valid_until):
    """A task Swarm restarts after a PATCH gets the keys written at the start again, so
    they must hold until the latest expiry a PATCH can set (the gateway ends the session on
    time itself); plain Docker keys expire with the session."""
    created = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
    session = a_session(created, authorized_keys=("ssh-ed25519 AAAAkey",))
    config = Config(runtime=runtime, max_ttl_minutes=120)
    files = {f.path: f.content.decode() for f in expiring_files(session, config)}
    assert files[f"{AUTHORIZED_KEYS_DIR}/alice"] == (
        f'expiry-time="{valid_until}" ssh-ed25519 AAAAkey\n'
    )


def _placed(state: str, created: str, err: str = ""):
    return {"CreatedAt": created, "Status": {"State": state, "Err": err}}


@pytest.mark.parametrize(
    ("tasks", "reason"),
    [
        ([], None),
        ([_placed("pending", "1", "no suitable node (1 node not available)")],
         "no suitable node (1 node not available)"),
        ([_placed("pending", "1")], "no node can run it"),
        ([_placed("assigned", "1")], None),  # a node took it
        ([_placed("pending", "1", "old"), _placed("running", "2")], None),  # newest counts
    ],
)  # fmt: skip
def test_a_task_waiting_for_a_node_gives_the_engines_reason(tasks, reason):
    assert unplaced_reason(tasks) == reason


def test_place_timeout_option():
    assert config_from_args(parse(["serve"], env={}), {}).place_timeout == 10.0
    args = parse(["serve", "--place-timeout", "3s"], env={})
    assert config_from_args(args, {}).place_timeout == 3.0
    with pytest.raises(ValueError, match="--place-timeout"):
        config_from_args(parse(["serve", "--place-timeout", "0"], env={}), {})


NOW = datetime(2026, 12, 6, 10, 0, 10, tzinfo=UTC)


def _since(state: str, timestamp: str, created: str = "2"):
    return {"CreatedAt": created, "DesiredState": "running",
            "Status": {"State": state, "Timestamp": timestamp}}  # fmt: skip


@pytest.mark.parametrize(
    ("tasks", "lost"),
    [
        ([_since("pending", "2026-12-06T10:00:05.123456789Z")], False),  # 4.9 s: may come
        ([_since("pending", "2026-12-06T10:00:04Z")], True),  # 6 s without a node
        ([_since("pending", "2026-12-06T10:00:00Z"), _since("running", "x", created="1")],
         False),  # still running elsewhere
        ([_since("assigned", "2026-12-06T10:00:00Z")], False),  # placed, starting
        ([_since("pending", "2026-12-06T10:00:00Z"),
          {**_since("running", "x", created="1"), "DesiredState": "shutdown"}],
         True),  # the old task on a node that went down still says "running"
        ([_since("pending", "garbage")], False),
    ],
)  # fmt: skip
def test_a_service_whose_task_found_no_node_for_long_is_lost(tasks, lost):
    assert stranded(tasks, NOW, timeout=5) is lost


def test_engine_times():
    assert parse_time("2026-12-06T10:00:05.123456789Z") == datetime(
        2026, 12, 6, 10, 0, 5, 123456, tzinfo=UTC
    )
    assert parse_time("2026-12-06T10:00:05Z") == datetime(2026, 12, 6, 10, 0, 5, tzinfo=UTC)
    assert parse_time("yesterday") is None

"""How the Swarm runtime reads the engine's answers: where a task's sshd answers, whether
Swarm still means to run a service, why a task waits, and what a node offers. Pure."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

from gateway.errors import ContainerStartFailed
from gateway.runtime.base import NodeInfo

#: Task states that will never run (the start fails with the engine's reason).
FAILED_STATES = {"failed", "rejected", "orphaned"}
#: Task states past running: the container is gone, its resources free.
STOPPED_STATES = FAILED_STATES | {"complete", "shutdown", "remove"}


def task_address(
    task: Mapping[str, Any], node_addresses: Mapping[str, str]
) -> tuple[str, int] | None:
    """Where a running task's sshd answers: its node's address and its published port.
    ``node_addresses`` holds the nodes that are up; a task Swarm is stopping (or gave up
    on, its node being down) gets no new connections."""
    if not runs(task):
        return None
    status = task.get("Status") or {}
    address = node_addresses.get(task.get("NodeID", ""))
    ports = (status.get("PortStatus") or {}).get("Ports") or []
    port = next((p.get("PublishedPort") for p in ports if p.get("TargetPort") == 22), None)
    if not address or not port:
        return None
    return address, int(port)


def assigned_slice(task: Mapping[str, Any]) -> str | None:
    """The GPU slice (a node's named generic resource, e.g. a MIG UUID) Swarm gave the
    task for its reservation, else None. The engine names the field ``GenericResources``
    (its Go type; 20.10 measured), its API reference ``AssignedGenericResources``."""
    assigned = task.get("GenericResources") or task.get("AssignedGenericResources") or []
    for item in assigned:
        if value := (item.get("NamedResourceSpec") or {}).get("Value"):
            return str(value)
    return None


def check_not_failed(tasks: Sequence[Mapping[str, Any]]) -> None:
    """Raises: ContainerStartFailed: Swarm gave the service up (its reason)."""
    if tasks and not wants_to_run(tasks):
        latest = max(tasks, key=lambda t: t.get("UpdatedAt", ""))
        status = latest.get("Status") or {}
        if status.get("State") in FAILED_STATES or latest.get("DesiredState") == "shutdown":
            reason = status.get("Err") or status.get("Message") or status.get("State")
            raise ContainerStartFailed(f"Swarm could not run the session: {reason}")


def unplaced_reason(tasks: Sequence[Mapping[str, Any]]) -> str | None:
    """The engine's reason while the service's newest task waits for a node that can run
    it (state new or pending), else None."""
    if not tasks:
        return None
    latest = max(tasks, key=lambda t: t.get("CreatedAt", ""))
    status = latest.get("Status") or {}
    if status.get("State") not in ("new", "pending"):
        return None
    return status.get("Err") or status.get("Message") or "no node can run it"


def stopping(tasks: Sequence[Mapping[str, Any]], ready_nodes: Collection[str]) -> bool:
    """Whether a removed service's tasks still hold their node's resources: some task has
    a container that has not stopped yet, on a node that is up (a node that is down
    reports nothing until it returns, and Swarm frees its slices then)."""
    return any(
        (t.get("Status") or {}).get("State") not in STOPPED_STATES
        and t.get("NodeID") in ready_nodes
        for t in tasks
    )


def runs(task: Mapping[str, Any]) -> bool:
    """Whether the task runs and Swarm wants it to: a task on a node that went down keeps
    its last state, "running", while Swarm has already given it up."""
    state = (task.get("Status") or {}).get("State")
    return state == "running" and task.get("DesiredState") == "running"


def stranded(tasks: Sequence[Mapping[str, Any]], now: datetime, timeout: float) -> bool:
    """Whether the service lost its task for good: none runs, and the newest has waited
    for a node longer than ``timeout`` (its node left and no other can take it)."""
    if any(runs(t) for t in tasks):
        return False
    if unplaced_reason(tasks) is None:
        return False
    latest = max(tasks, key=lambda t: t.get("CreatedAt", ""))
    since = parse_time((latest.get("Status") or {}).get("Timestamp", ""))
    return since is not None and (now - since).total_seconds() > timeout


def parse_time(text: str) -> datetime | None:
    """An Engine API time (RFC 3339 with nanoseconds), aware UTC; None if malformed."""
    found = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z$", text)
    if found is None:
        return None
    fraction = (found[2] or ".0")[:7]
    return datetime.fromisoformat(found[1] + fraction + "+00:00")


def wants_to_run(tasks: Sequence[Mapping[str, Any]]) -> bool:
    """Whether Swarm still means to run the service: some task is desired running (or
    ready, mid-update). A service whose tasks all failed past the restart limit has none."""
    return any(t.get("DesiredState") in ("running", "ready") for t in tasks)


def node_info(node: Mapping[str, Any], gateway_node: str | None) -> NodeInfo:
    """Our view of a ``GET /nodes`` entry."""
    description = node.get("Description") or {}
    resources = description.get("Resources") or {}
    status = node.get("Status") or {}
    spec = node.get("Spec") or {}
    generic = []
    for item in resources.get("GenericResources") or []:
        named, discrete = item.get("NamedResourceSpec"), item.get("DiscreteResourceSpec")
        if named:
            generic.append((named.get("Kind", ""), str(named.get("Value", ""))))
        elif discrete:
            generic.append((discrete.get("Kind", ""), str(discrete.get("Value", 0))))
    return NodeInfo(
        id=node.get("ID", ""),
        hostname=description.get("Hostname", ""),
        role=spec.get("Role", ""),
        state=status.get("State", "unknown"),
        availability=spec.get("Availability", ""),
        address=status.get("Addr") or None,
        cpus=resources.get("NanoCPUs", 0) / 1e9,
        memory=int(resources.get("MemoryBytes", 0)),
        engine_version=(description.get("Engine") or {}).get("EngineVersion", ""),
        resources=tuple(sorted(generic)),
        gateway=node.get("ID") == gateway_node,
    )

"""Test doubles for what unit tests cannot have: Docker, GPUs and the wall clock.

``FakeRuntime`` runs, per "container", a tiny TCP server on loopback that greets
like sshd, so the real relay and readiness probe are exercised without Docker.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from gateway.errors import ContainerStartFailed, DockerUnavailable
from gateway.runtime.base import LABEL_INSTANCE, CommandResult, ContainerInfo, ContainerSpec


class Clock:
    """A settable clock."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class FakeContainer:
    spec: ContainerSpec
    id: str
    running: bool = False
    server: asyncio.Server | None = None
    port: int = 0


@dataclass
class FakeRuntime:
    """In-memory containers. ``mode``: "ok", "never_ready", "crash" or "fail_create"."""

    mode: str = "ok"
    reachable: bool = True
    containers: dict[str, FakeContainer] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    execs: list[tuple[str, list[str], str]] = field(default_factory=list)
    runs: list[tuple[str, list[str], str]] = field(default_factory=list)
    #: the devices ``nvidia-smi -L`` lists in any container; None: exactly the container's
    #: own GPU, as a correctly configured NVIDIA Container Toolkit exposes it
    visible_gpus: tuple[str, ...] | None = None
    networks: set[str] = field(default_factory=set)
    _ids: itertools.count = field(default_factory=itertools.count)

    def _check(self) -> None:
        if not self.reachable:
            raise DockerUnavailable("the Docker engine is unreachable")

    async def ping(self) -> None:
        self._check()

    async def ensure_network(self, name: str, *, egress: bool) -> None:
        self._check()
        self.networks.add(name)

    async def create(self, spec: ContainerSpec) -> str:
        self._check()
        if self.mode == "fail_create":
            raise ContainerStartFailed("Docker refused to create the container")
        cid = f"fake{next(self._ids):012d}"
        self.containers[cid] = FakeContainer(spec=spec, id=cid)
        return cid

    async def _greet(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-FakeSSH\r\n")
        await writer.drain()
        while await reader.read(1024):
            pass
        writer.close()

    async def start(self, container_id: str, network: str) -> ContainerInfo:
        self._check()
        container = self.containers[container_id]
        container.running = self.mode != "crash"
        if self.mode == "ok" and container.server is None:
            container.server = await asyncio.start_server(self._greet, "127.0.0.1", 0)
            container.port = container.server.sockets[0].getsockname()[1]
        info = await self.inspect(container_id, network)
        assert info is not None
        return info

    async def inspect(self, container_id: str, network: str) -> ContainerInfo | None:
        self._check()
        c = self.containers.get(container_id)
        if c is None:
            return None
        return ContainerInfo(
            id=c.id,
            name=c.spec.name,
            running=c.running,
            ip="127.0.0.1",
            labels=c.spec.labels,
            ssh_port=c.port or 1,
        )

    async def remove(self, container_id: str) -> None:
        self._check()
        container = self.containers.pop(container_id, None)
        if container is not None:
            self.removed.append(container_id)
            if container.server is not None:
                container.server.close()

    async def list_owned(self, instance: str, network: str) -> list[ContainerInfo]:
        infos = [await self.inspect(cid, network) for cid in list(self.containers)]
        return [i for i in infos if i is not None and i.labels.get(LABEL_INSTANCE) == instance]

    async def logs(self, container_id: str, tail: int = 20) -> str:
        return "fake log"

    async def exec(self, container_id: str, argv: list[str], *, user: str) -> None:
        self._check()
        self.execs.append((container_id, argv, user))

    async def close(self) -> None:
        for container in self.containers.values():
            if container.server is not None:
                container.server.close()

    async def run(self, container_id: str, argv: list[str], *, user: str) -> CommandResult:
        """Only ``nvidia-smi -L`` exists in these containers."""
        self._check()
        self.runs.append((container_id, argv, user))
        if argv != ["nvidia-smi", "-L"]:
            return CommandResult(127, f"{argv[0]}: not found")
        own = self.containers[container_id].spec.gpu_uuid
        visible = self.visible_gpus if self.visible_gpus is not None else (own,) if own else ()
        return nvidia_smi_list(visible)


def nvidia_smi_list(uuids: tuple[str, ...]) -> CommandResult:
    """What ``nvidia-smi -L`` prints for these GPU and MIG UUIDs (MIG devices under one GPU)."""
    gpus = [u for u in uuids if not u.startswith("MIG-")]
    migs = [u for u in uuids if u.startswith("MIG-")]
    if migs and not gpus:
        gpus = ["GPU-parent-of-the-mig-devices"]
    lines = [f"GPU {i}: NVIDIA A100-SXM4-80GB (UUID: {uuid})" for i, uuid in enumerate(gpus)]
    lines += [f"  MIG 1g.10gb     Device  {i}: (UUID: {uuid})" for i, uuid in enumerate(migs)]
    if not lines:
        return CommandResult(6, "No devices were found\n")
    return CommandResult(0, "\n".join(lines) + "\n")

"""Test doubles for what unit tests cannot have: Docker, GPUs and the wall clock.

``FakeRuntime`` runs, per "container", a real SSH server (asyncssh) on loopback that
offers the host key and certificate the gateway copied into the container, so the real
relay and readiness check are exercised without Docker.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncssh

from gateway.errors import ContainerStartFailed, DockerUnavailable
from gateway.runtime.base import LABEL_INSTANCE, ContainerFile, ContainerInfo, ContainerSpec
from gateway.session_files import HOST_KEY


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
    files: dict[str, bytes] = field(default_factory=dict)

    def host_key(self) -> tuple[asyncssh.SSHKey, asyncssh.SSHCertificate]:
        key = asyncssh.import_private_key(self.files[HOST_KEY])
        return key, asyncssh.import_certificate(self.files[HOST_KEY + "-cert.pub"])


def _stranger_host_key() -> tuple[asyncssh.SSHKey, asyncssh.SSHCertificate]:
    """A host key certified by some other CA, for principals the gateway also asks for."""
    ca, key = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(2))
    cert = ca.generate_host_certificate(key, "stranger", principals=["*"], valid_before=2**40)
    return key, cert


@dataclass
class FakeRuntime:
    """In-memory containers. ``mode``: "ok", "never_ready", "crash", "fail_create" or
    "wrong_host_key" (an SSH server answers, but not with the session's host key)."""

    mode: str = "ok"
    reachable: bool = True
    containers: dict[str, FakeContainer] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    execs: list[tuple[str, list[str], str]] = field(default_factory=list)
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

    async def start(self, container_id: str, network: str) -> ContainerInfo:
        self._check()
        container = self.containers[container_id]
        container.running = self.mode != "crash"
        if self.mode in ("ok", "wrong_host_key") and container.server is None:
            host_key = container.host_key() if self.mode == "ok" else _stranger_host_key()
            container.server = await asyncssh.create_server(
                asyncssh.SSHServer, "127.0.0.1", 0, server_host_keys=[host_key]
            )
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

    async def put_files(self, container_id: str, files: Sequence[ContainerFile]) -> None:
        self._check()
        self.containers[container_id].files.update({f.path: f.content for f in files})

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

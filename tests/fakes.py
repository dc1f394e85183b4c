"""Test doubles for what unit tests cannot have: Docker, GPUs and the wall clock.

``FakeRuntime`` runs, per "container", a real SSH server (asyncssh) on loopback that
offers the host key and certificate the gateway copied into the container, so the real
relay and readiness check are exercised without Docker.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncssh

from gateway.core import gpu_activity
from gateway.core.gpu_delivery import DEVICE_REQUEST, GpuPath, gpu_path
from gateway.core.idle import Reading
from gateway.errors import ContainerStartFailed, DockerUnavailable, NoCapacity
from gateway.runtime.base import (
    LABEL_INSTANCE,
    LABEL_SESSION,
    AddressLookup,
    CommandResult,
    ContainerFile,
    ContainerInfo,
    ContainerSpec,
    NodeInfo,
)
from gateway.runtime.docker import container_config
from gateway.session_files import HOST_KEY
from tests.net import free_tcp_port

#: ``docker info`` of Docker 29.2 with CDI on, the toolkit's spec written at boot (two
#: whole GPUs and one MIG instance made before it) and the nvidia runtime registered
CDI_DOCKER: dict[str, Any] = {
    "ServerVersion": "29.2.0",
    "CDISpecDirs": ["/etc/cdi", "/var/run/cdi"],
    "DiscoveredDevices": [
        {"Source": "cdi", "ID": "nvidia.com/gpu=all"},
        {"Source": "cdi", "ID": "nvidia.com/gpu=GPU-whole-0001"},
        {"Source": "cdi", "ID": "nvidia.com/gpu=GPU-h100-0000"},
        {"Source": "cdi", "ID": "nvidia.com/gpu=MIG-made-at-boot"},
    ],
    "Runtimes": {"runc": {"path": "runc"}, "nvidia": {"path": "nvidia-container-runtime"}},
}
#: the same daemon without the nvidia runtime registered
CDI_DOCKER_NO_RUNTIME: dict[str, Any] = {**CDI_DOCKER, "Runtimes": {"runc": {"path": "runc"}}}


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
    cpu_seconds: float = 0.0  # CPU time used so far (a test raises it to look busy)
    #: what ``nvidia-smi --query-compute-apps=pid,used_memory`` prints in it (a test adds a
    #: line to run a GPU process); the runtime answers it when ``gpu_inside`` is set
    gpu_apps: str = ""
    body: dict[str, Any] = field(default_factory=dict)  # what containers/create was sent
    task: int = 0  # how many times Swarm replaced its task (:meth:`FakeRuntime.replace_task`)

    def host_key(self) -> tuple[asyncssh.SSHKey, asyncssh.SSHCertificate]:
        key = asyncssh.import_private_key(self.files[HOST_KEY])
        return key, asyncssh.import_certificate(self.files[HOST_KEY + "-cert.pub"])


def _stranger_host_key() -> tuple[asyncssh.SSHKey, asyncssh.SSHCertificate]:
    """A host key certified by some other CA, for principals the gateway also asks for."""
    ca, key = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(2))
    cert = ca.generate_host_certificate(key, "stranger", principals=["*"], valid_before=2**40)
    return key, cert


@dataclass
class Gate:
    """A point where the fake runtime stops until the test opens it."""

    reached: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    def open(self) -> None:
        self.opened.set()


@dataclass
class FakeRuntime:
    """In-memory containers, as unkind as Docker by default. ``mode``: "ok", "never_ready",
    "crash", "fail_create", "wrong_host_key" (an SSH server answers, but not with the
    session's host key) or "no_capacity" (as a Swarm whose nodes take no task: the start
    fails with :class:`NoCapacity` once ``--place-timeout`` is over).

    Like Docker: a container that is not running has no address; a name in use is refused
    (409, which the real runtime reports as :class:`ContainerStartFailed`); every removal,
    the gateway's own included, sends ``die`` (if it ran) and ``destroy`` to the event
    streams open at the time (none are kept for later); the stream can break
    (:meth:`break_events`); every call can be slowed (``delay``) or held for ever
    (:meth:`pause` with a gate never opened); :meth:`close` (the gateway's shutdown) leaves
    the containers running."""

    mode: str = "ok"
    reachable: bool = True
    gone_reason: str = "container_gone"
    no_address: bool = False  # running containers get no address on the network
    delay: float = 0.0  # seconds every Docker call takes
    containers: dict[str, FakeContainer] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    execs: list[tuple[str, list[str], str]] = field(default_factory=list)
    gpu_checks: list[str] = field(default_factory=list)  # the containers asked for GPUs
    #: the devices ``nvidia-smi -L`` lists in any container; None: exactly the container's
    #: own GPU, as a correctly configured NVIDIA Container Toolkit exposes it
    seen_gpus: tuple[str, ...] | None = None
    #: as a Swarm's node generic resources: the slice the engine assigns a container whose
    #: spec asks for a profile (``gpu_slice``), reported as its ``gpu_uuid``
    engine_slices: dict[str, str] = field(default_factory=dict)
    #: as a Swarm: a running container reports the id of the task running it
    #: (:meth:`replace_task` makes a new one); off: plain Docker, which has no tasks
    swarm_tasks: bool = False
    networks: set[str] = field(default_factory=set)
    #: the open event streams: each gets the session id of every event (None: it broke)
    subscribers: list[asyncio.Queue[str | None]] = field(default_factory=list)
    gates: dict[str, Gate] = field(default_factory=dict)
    failing: set[str] = field(default_factory=set)  # steps that raise DockerUnavailable
    #: the daemon's ``docker info`` (ServerVersion, CDISpecDirs, DiscoveredDevices, Runtimes);
    #: empty: an engine before CDI routing, where the toolkit's hook resolves GPU requests
    daemon_info: dict[str, Any] = field(default_factory=dict)
    #: as a Swarm with a control channel: a container's GPU is read from inside it (its
    #: ``gpu_apps``, a MIG device with no utilisation); False: the gateway's backend reads it
    gpu_inside: bool = False
    #: a Swarm's nodes, the first holding every task; empty: plain Docker (this host alone)
    swarm_nodes: list[NodeInfo] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=itertools.count)

    def _check(self, step: str = "") -> None:
        if not self.reachable or step in self.failing:
            raise DockerUnavailable("the Docker engine is unreachable")

    def pause(self, step: str) -> Gate:
        """Stop at ``step`` ("create", "created", "put_files", "start", "inspect", "remove",
        or "sshd": started, but its SSH server not yet listening) until the returned gate is
        opened."""
        gate = self.gates[step] = Gate()
        return gate

    async def _step(self, step: str) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        gate = self.gates.get(step)
        if gate is not None:
            gate.reached.set()
            await gate.opened.wait()
        self._check(step)

    async def ping(self) -> None:
        await self._step("ping")

    async def gpu_path(self) -> GpuPath:
        self._check()
        return gpu_path(self.daemon_info)

    async def ensure_network(self, name: str, *, egress: bool) -> None:
        self._check()
        self.networks.add(name)

    async def create(self, spec: ContainerSpec) -> str:
        await self._step("create")
        if self.mode == "fail_create":
            raise ContainerStartFailed("Docker refused to create the container")
        if self.find(spec.name) is not None:
            raise ContainerStartFailed(
                f"Docker refused to create container {spec.name}: Conflict. The container "
                f'name "/{spec.name}" is already in use'
            )
        cid = f"fake{next(self._ids):012d}"
        delivery = (await self.gpu_path()).delivery if spec.device_request else DEVICE_REQUEST
        body = container_config(spec, delivery)
        self.containers[cid] = FakeContainer(spec=spec, id=cid, body=body)
        await self._step("created")  # made, but its id not yet back with the caller
        return cid

    def _resolve_devices(self, container: FakeContainer) -> None:
        """As Docker ≥ 29.2 does on the CDI path: a requested device its CDI specs don't
        list fails the start (the runtime path and the toolkit's hook find any device)."""
        path = gpu_path(self.daemon_info)
        for request in container.body["HostConfig"].get("DeviceRequests", ()):
            for device in request["DeviceIDs"]:
                if path.through_cdi and f"nvidia.com/gpu={device}" not in path.cdi_gpu_devices:
                    raise ContainerStartFailed(
                        "Docker refused to start container: failed to create task for "
                        f"container: unresolvable CDI devices nvidia.com/gpu={device}"
                    )

    async def start(self, container_id: str, network: str) -> ContainerInfo:
        await self._step("start")
        container = self._existing(container_id, "start the container")
        if self.mode == "no_capacity":
            raise NoCapacity(
                "no node can run the session now: no suitable node (insufficient resources"
                " on 1 node)"
            )
        self._resolve_devices(container)
        container.running = True
        if self.mode in ("ok", "wrong_host_key") and container.server is None:
            host_key = container.host_key() if self.mode == "ok" else _stranger_host_key()
            container.port = free_tcp_port()
            serve = self._serve(container, host_key)
            if "sshd" in self.gates:
                self.tasks.append(asyncio.create_task(serve))
            else:
                await serve
        info = await self.inspect(container_id, network)
        assert info is not None
        if self.mode == "crash":  # its entrypoint fails a moment after the start
            container.running = False
            self._emit(container, "die")
        return info

    async def _serve(
        self, container: FakeContainer, host_key: tuple[asyncssh.SSHKey, asyncssh.SSHCertificate]
    ) -> None:
        await self._step("sshd")
        container.server = await asyncssh.create_server(
            asyncssh.SSHServer, "127.0.0.1", container.port, server_host_keys=[host_key]
        )

    async def inspect(self, container_id: str, network: str) -> ContainerInfo | None:
        await self._step("inspect")
        c = self.find(container_id)
        return None if c is None else self._info(c)

    def _info(self, c: FakeContainer) -> ContainerInfo:
        return ContainerInfo(
            id=c.id,
            name=c.spec.name,
            running=c.running,
            ip="127.0.0.1" if c.running and not self.no_address else None,
            labels=c.spec.labels,
            ssh_port=c.port or 1,
            gpu_uuid=self._assigned(c),
            task_id=f"task-{c.id}-{c.task}" if c.running and self.swarm_tasks else None,
        )

    def _assigned(self, c: FakeContainer) -> str | None:
        return None if c.spec.gpu_slice is None else self.engine_slices.get(c.spec.gpu_slice)

    async def remove(self, container_id: str) -> None:
        await self._step("remove")
        container = self.find(container_id)
        if container is not None:
            self._gone(container)
            self.removed.append(container.id)

    def _gone(self, container: FakeContainer) -> None:
        """Docker's side of a removal: the container and its sshd go, and every open
        event stream hears ``die`` (if it ran) and ``destroy``."""
        del self.containers[container.id]
        if container.server is not None:
            container.server.close()
        self._emit(container, *(["die"] if container.running else []), "destroy")

    def _emit(self, container: FakeContainer, *events: str) -> None:
        for queue in self.subscribers:
            for _ in events:
                queue.put_nowait(container.spec.labels[LABEL_SESSION])

    def find(self, id_or_name: str) -> FakeContainer | None:
        """Docker takes an id or a name wherever it takes a container."""
        found = self.containers.get(id_or_name)
        if found is None:
            found = next((c for c in self.containers.values() if c.spec.name == id_or_name), None)
        return found

    async def container_exits(self, instance: str) -> AsyncIterator[str]:
        self._check()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.subscribers.append(queue)
        try:
            while (session_id := await queue.get()) is not None:
                yield session_id
        finally:
            self.subscribers.remove(queue)
        raise DockerUnavailable("the Docker engine is unreachable")  # the stream broke

    def break_events(self) -> None:
        """The engine drops its event streams (a restart, say): each ends with an error."""
        for queue in self.subscribers:
            queue.put_nowait(None)

    def kill(self, container_id: str) -> None:
        """What ``docker rm -f`` does behind the gateway's back: gone, with its events."""
        self._gone(self.containers[container_id])

    def replace_task(self, container_id: str) -> None:
        """What Swarm does when it restarts or moves a task (``docker service update
        --force``, a node lost): the same service under a new task id, holding the slice
        :attr:`engine_slices` names now, and seeing what :attr:`seen_gpus` says."""
        self.containers[container_id].task += 1

    def _existing(self, container_id: str, doing: str) -> FakeContainer:
        """Docker answers 404 for a container that is gone (the runtime's translation)."""
        container = self.find(container_id)
        if container is None:
            raise ContainerStartFailed(f"Docker refused to {doing}: No such container")
        return container

    async def put_files(self, container_id: str, files: Sequence[ContainerFile]) -> None:
        await self._step("put_files")
        container = self._existing(container_id, "copy files into the container")
        container.files.update({f.path: f.content for f in files})

    async def list_owned(self, instance: str, network: str) -> list[ContainerInfo]:
        self._check()
        infos = [self._info(c) for c in self.containers.values()]
        return [i for i in infos if i.labels.get(LABEL_INSTANCE) == instance]

    def address_lookup(self, container_id: str, network: str) -> AddressLookup | None:
        return None  # like Docker's: a container keeps its address

    def node_of(self, container_id: str) -> str | None:
        placed = self.swarm_nodes and container_id in self.containers
        return self.swarm_nodes[0].hostname if placed else None

    async def nodes(self) -> list[NodeInfo]:
        self._check()
        if self.swarm_nodes:
            return self.swarm_nodes
        return [NodeInfo("fake-node", "fakehost", "standalone", "ready", "active", None, 2.0,
                         2**30, "0.0-fake", gateway=True)]  # fmt: skip

    async def logs(self, container_id: str, tail: int = 20) -> str:
        return "fake log"

    async def exec(self, container_id: str, argv: list[str], *, user: str) -> None:
        await self._step("exec")
        self._existing(container_id, "exec in the container")
        self.execs.append((container_id, argv, user))

    async def tell(self, container_id: str, message: str) -> None:
        """As Docker's: ``wall`` run in the container with the tty group."""
        await self.exec(container_id, ["wall", message], user="0:5")

    async def cpu_seconds(self, container_id: str) -> float | None:
        """The container's ``cpu_seconds`` (a test raises it to look busy)."""
        await self._step("cpu_seconds")
        container = self.find(container_id)
        return None if container is None or not container.running else container.cpu_seconds

    async def gpu_reading(self, container_id: str) -> Reading | None:
        """With ``gpu_inside``, the container's ``gpu_apps`` parsed as the control channel's
        answer is; else None (the gateway's backend reads the GPU)."""
        await self._step("gpu_reading")
        container = self._existing(container_id, "read the container's GPU")
        if not self.gpu_inside:
            return None
        if not container.running:
            raise ContainerStartFailed(f"container {container_id} is not running")
        reading = gpu_activity.reading((0, container.gpu_apps), (0, "[N/A]\n"))
        if reading is None:
            raise ContainerStartFailed("the session's GPU reading was not understood")
        return reading

    async def close(self) -> None:
        """The gateway lets go of the engine; its containers keep running, as Docker's do."""
        for task in self.tasks:
            task.cancel()

    def shut_down(self) -> None:
        """The engine stops (a test's end): every container's sshd goes."""
        for container in self.containers.values():
            if container.server is not None:
                container.server.close()

    async def visible_gpus(self, container_id: str) -> CommandResult:
        """``nvidia-smi -L`` in a running container: :attr:`seen_gpus`, else its own GPU."""
        await self._step("visible_gpus")
        container = self._existing(container_id, "list the container's GPUs")
        self.gpu_checks.append(container_id)
        if not container.running:
            raise ContainerStartFailed(f"container {container_id} is not running")
        own = container.spec.gpu_uuid or self._assigned(container)
        visible = self.seen_gpus if self.seen_gpus is not None else (own,) if own else ()
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


#: a two-node Swarm whose worker holds a MIG slice, for :attr:`FakeRuntime.swarm_nodes`
SWARM_NODES = [
    NodeInfo("n-worker", "worker1", "worker", "ready", "active", "10.0.0.2", 4.0, 2**32,
             "27.0", (("NVIDIA-MIG", "MIG-worker-1"),)),
    NodeInfo("n-manager", "manager1", "manager", "ready", "drain", "10.0.0.1", 2.0, 2**31,
             "27.0", gateway=True),
]  # fmt: skip

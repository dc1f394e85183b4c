"""What the orchestrator needs from a container runtime, and the types it speaks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gateway.core.gpu_delivery import GpuPath
from gateway.core.idle import Reading

LABEL_SESSION = "sandman.session_id"
LABEL_USER = "sandman.user_id"
LABEL_INSTANCE = "sandman.instance"

#: Where a session's sshd answers now (None: nowhere yet).
AddressLookup = Callable[[], Awaitable[tuple[str, int] | None]]


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """Everything needed to create one session container."""

    name: str
    image: str
    hostname: str
    env: dict[str, str]
    labels: dict[str, str]
    workspace: Path  # host folder, bound at /home/<user>
    home: str
    network: str
    pids_limit: int
    gpu_uuid: str | None = None
    device_request: bool = False  # ask the nvidia runtime for exactly gpu_uuid
    #: a GPU slice profile (MIG profile, ``full``) the engine picks the device of (Swarm:
    #: a generic resource reservation); then ``gpu_uuid`` is None
    gpu_slice: str | None = None
    cap_add: tuple[str, ...] = field(default=())
    cpu_limit: float | None = None  # CPUs; None: unlimited
    memory_limit: int | None = None  # bytes (swap included); None: unlimited


@dataclass(frozen=True, slots=True)
class ContainerFile:
    """A file copied into a container (owned by root; missing parent folders are made 0755)."""

    path: str  # absolute path inside the container
    content: bytes
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    id: str
    name: str
    running: bool
    ip: str | None
    labels: dict[str, str]
    ssh_port: int = 22  # where the container's sshd listens on ``ip``
    gpu_uuid: str | None = None  # the GPU slice the engine assigned (``ContainerSpec.gpu_slice``)
    #: the engine's id of the task running the container now (Swarm: a new one each time
    #: Swarm restarts or moves it); None where the container is the task (plain Docker)
    task_id: str | None = None


@dataclass(frozen=True, slots=True)
class CommandResult:
    """How a command run in a container ended, and what it wrote (stdout and stderr)."""

    exit_code: int
    output: str


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A machine sessions can run on, as its engine reports it."""

    id: str
    hostname: str
    role: str  # "manager", "worker", or "standalone" (plain Docker)
    state: str  # "ready", "down", "unknown", "disconnected"
    availability: str  # "active", "pause", "drain"
    address: str | None
    cpus: float
    memory: int  # bytes
    engine_version: str
    #: the node's generic resources (GPU slices), as (kind, value): a named resource's
    #: value (e.g. a MIG UUID), or a discrete resource's count
    resources: tuple[tuple[str, str], ...] = ()
    gateway: bool = False  # the node this gateway runs on


class Runtime(Protocol):
    """Create, start, inspect and remove session containers.

    ``remove`` is idempotent: a container that is already gone is success.
    Every method raises :class:`gateway.errors.DockerUnavailable` when the engine
    cannot be reached.
    """

    #: The end reason of a session whose container (or service) vanished.
    gone_reason: str

    async def ping(self) -> None: ...

    async def gpu_path(self) -> GpuPath:
        """How the engine hands GPUs to containers (:mod:`gateway.core.gpu_delivery`);
        ``create`` asks for a spec's GPU that way."""
        ...

    async def ensure_network(self, name: str, *, egress: bool) -> None: ...

    async def create(self, spec: ContainerSpec) -> str: ...

    async def start(self, container_id: str, network: str) -> ContainerInfo: ...

    async def inspect(self, container_id: str, network: str) -> ContainerInfo | None:
        """The container with this id or name; None if there is none."""
        ...

    async def remove(self, container_id: str) -> None:
        """Remove the container with this id or name (idempotent)."""
        ...

    async def put_files(self, container_id: str, files: Sequence[ContainerFile]) -> None:
        """Copy ``files`` into the container, created or running, replacing what is there."""
        ...

    async def list_owned(self, instance: str, network: str) -> list[ContainerInfo]: ...

    def address_lookup(self, container_id: str, network: str) -> AddressLookup | None:
        """How the relay finds the container at each new connection, for runtimes whose
        containers can move or be replaced while the session lives; None when the address
        :meth:`start` returned holds for the container's life."""
        ...

    def container_exits(self, instance: str) -> AsyncIterator[str]:
        """The session ids (label) of ``instance``'s containers as each dies or is removed,
        until the engine's event stream ends."""
        ...

    def node_of(self, container_id: str) -> str | None:
        """The host name of the node the container last ran on, as this runtime last saw
        it (no engine call); None with plain Docker (this host) or when not known yet."""
        ...

    async def nodes(self) -> list[NodeInfo]:
        """The machines sessions can run on (plain Docker: this one)."""
        ...

    async def logs(self, container_id: str, tail: int = 20) -> str: ...

    async def exec(self, container_id: str, argv: list[str], *, user: str) -> None:
        """Start ``argv`` in the container as ``user`` ("uid:gid"), without waiting."""
        ...

    async def visible_gpus(self, container_id: str) -> CommandResult:
        """What ``nvidia-smi -L`` lists in the running container (:data:`GPU_LIST`, run as
        root): the devices the NVIDIA toolkit gave it, for the GPU pin check.

        The caller bounds the time (e.g. with ``asyncio.timeout``).
        """
        ...

    async def cpu_seconds(self, container_id: str) -> float | None:
        """The CPU time the container has used so far (all its processes, seconds); None
        if it is not running."""
        ...

    async def gpu_reading(self, container_id: str) -> Reading | None:
        """What the container's GPU is doing, read from inside it (``nvidia-smi``), for a
        runtime whose containers run where the gateway's NVML cannot see; None when the
        gateway's own GPU backend reads it (plain Docker: this host's GPUs).

        Raises:
            GatewayError: the container could not be asked, or said nothing usable.
        """
        ...

    async def tell(self, container_id: str, message: str) -> None:
        """Write ``message`` to every terminal open in the container (``wall``)."""
        ...

    async def close(self) -> None: ...


#: The command whose output names the GPU devices a container sees.
GPU_LIST: tuple[str, ...] = ("nvidia-smi", "-L")

#: Capabilities the workspace image's entrypoint and sshd need on top of ``CapDrop: ALL``;
#: why each is needed is in workspace-image/CAPABILITIES.md.
SSHD_CAPABILITIES: tuple[str, ...] = (
    "CHOWN",
    "SETGID",
    "SETUID",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
)

"""The Docker Swarm implementation of :class:`~gateway.runtime.base.Runtime`, via aiodocker.

Each session is one replicated service (1 replica) with the same image, capabilities,
limits, labels and workspace mount as a plain container. What the plain runtime copies
into a container before it starts (host key, certificate, authorized keys, password hash,
session facts) becomes Swarm secrets (mode 0600 files) and configs (the rest), mounted
under :data:`FILES_ROOT`, so every task Swarm starts for the service, on any node, gets
them again; the service's command installs them in place and runs the image's entrypoint
under ``setpriv --no-new-privs`` (Docker 20.10's service spec has no no-new-privileges).

The task publishes its sshd in host mode (no routing mesh or overlay is needed); the relay
finds it at each connection from the task status: the node's address and the published
port (:meth:`SwarmRuntime.address_lookup`). A service's "container id" is its name.

Placement: every task runs on the gateway's own node (where the workspace root is), or
with shared workspaces on any node (docs/scale-out.md). What is asked of the engine is
built in :mod:`gateway.runtime.swarm_spec`, its answers read in
:mod:`gateway.runtime.swarm_tasks`; this module does the I/O.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiodocker
from aiodocker.exceptions import DockerError

from gateway.core.idle import Reading
from gateway.errors import ContainerStartFailed, DockerUnavailable, GatewayError, NoCapacity
from gateway.models import utcnow
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
from gateway.runtime.docker import (
    CALL_TIMEOUT_SECONDS,
    DockerRuntime,
    bounded,
    engine_call,
    follow_events,
    translate_error,
)
from gateway.runtime.swarm_spec import (
    LABEL_SERVICE,
    SHARED_SENTINEL,
    Placement,
    file_object_name,
    file_reference,
    is_secret,
    network_config_name,
    service_spec,
)
from gateway.runtime.swarm_tasks import (
    assigned_slice,
    check_not_failed,
    node_info,
    stopping,
    stranded,
    task_address,
    unplaced_reason,
    wants_to_run,
)
from gateway.ssh.control import ControlChannel

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How often a start looks at its task, and how long a connection waits for a task that
#: Swarm is replacing.
TASK_POLL_SECONDS = 0.1
REPLACEMENT_WAIT_SECONDS = 4.0
BANNER_WAIT_SECONDS = 1.0
#: How long a removal waits for the service's task to stop (and free its GPU slice).
TASKS_GONE_WAIT_SECONDS = 10.0


def _sentinel_token(path: Path) -> str:
    """The token in the shared workspace root's sentinel file, written first if absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(secrets.token_hex(16) + "\n")
        path.chmod(0o644)
    return path.read_text().strip()


async def sshd_answers(address: tuple[str, int]) -> bool:
    """Whether an SSH server sends its identification line at ``address`` within
    :data:`BANNER_WAIT_SECONDS` (the connection is then closed)."""
    try:
        async with asyncio.timeout(BANNER_WAIT_SECONDS):
            reader, writer = await asyncio.open_connection(*address)
            try:
                return (await reader.readline()).startswith(b"SSH-")
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False


class SwarmRuntime:
    """Session services on the Swarm this engine manages."""

    gone_reason = "backend_gone"  # the service was removed, or all its tasks failed

    def __init__(
        self,
        docker: aiodocker.Docker | None = None,
        *,
        place_timeout: float = 10.0,
        shared_root: Path | None = None,
        channel: ControlChannel | None = None,
    ) -> None:
        """``shared_root``: the workspace root is the same shared storage on every node, so
        tasks may run on any node; None pins them to the gateway's node. ``channel``: how
        files reach a running task (else only tasks on this node, through the Engine)."""
        self._docker = docker or aiodocker.Docker()
        self._place_timeout = place_timeout
        self._shared_root = shared_root
        self._channel = channel
        self._placement: Placement | None = None
        self._local = DockerRuntime(self._docker)  # tasks on this node: exec, files, logs
        self._pending: dict[str, ContainerSpec] = {}  # created, not yet started
        self._files: dict[str, list[ContainerFile]] = {}  # for the start
        self._node_id: str | None = None
        self._sessions: dict[str, str] = {}  # service name -> session id (for removals)
        self._answering: dict[str, str] = {}  # service name -> the task seen answering SSH
        self._rewritten: dict[str, list[ContainerFile]] = {}  # files changed since the start
        self._hostnames: dict[str, str] = {}  # node id -> host name
        self._where: dict[str, str] = {}  # service name -> the host name of its task's node

    async def close(self) -> None:
        await self._docker.close()

    async def _call(self, doing: str, call: Callable[[], Awaitable[T]]) -> T:
        return await engine_call(doing, call)

    async def ping(self) -> None:
        """Raises: DockerUnavailable: no engine, or this engine is not a Swarm manager."""
        info = await self._call("answer a ping", self._docker.system.info)
        swarm = info.get("Swarm") or {}
        if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
            raise DockerUnavailable(
                "the Docker engine is not a Swarm manager (run `docker swarm init`)",
                log_message=f"swarm state {swarm.get('LocalNodeState')!r}",
            )
        self._node_id = swarm.get("NodeID")

    async def ensure_network(self, name: str, *, egress: bool) -> None:
        """Check the engine is a Swarm manager, and make the session network unless it
        exists: a Swarm-scoped bridge (on each node, a local bridge; no overlay, so no
        VXLAN and no per-node constraint trouble) whose options (inter-container traffic
        off) come from the config-only network ``<name>-config``, which every node needs.

        ``egress`` must be on (the configuration refuses ``--no-egress`` with Swarm: an
        internal network publishes no ports, and the relay reaches tasks by one).

        Raises:
            DockerUnavailable: not a manager.
        """
        await self.ping()
        config = network_config_name(name)
        await self._local.create_network(
            {
                "Name": config,
                "ConfigOnly": True,
                "Labels": {"sandman.network": "1"},
                "Options": {"com.docker.network.bridge.enable_icc": "false"},
            }
        )
        await self._local.create_network(
            {
                "Name": name,
                "Driver": "bridge",
                "Scope": "swarm",
                "ConfigFrom": {"Network": config},  # and nothing else: the engine refuses it
            }
        )
        await self._placement_of_tasks()  # the shared workspaces' sentinel, made now

    async def _placement_of_tasks(self) -> Placement:
        if self._placement is None:
            if self._shared_root is None:
                self._placement = Placement(node_id=await self._own_node())
            else:
                sentinel = self._shared_root / SHARED_SENTINEL
                token = await asyncio.to_thread(_sentinel_token, sentinel)
                self._placement = Placement(sentinel=str(sentinel), token=token)
        return self._placement

    async def _own_node(self) -> str:
        if self._node_id is None:
            await self.ping()
        assert self._node_id is not None
        return self._node_id

    async def create(self, spec: ContainerSpec) -> str:
        """Remember ``spec``; the service is made by :meth:`start`, once its files are known
        (secrets and configs cannot be added to a task later without replacing it)."""
        self._pending[spec.name] = spec
        self._sessions[spec.name] = spec.labels.get(LABEL_SESSION, "")
        return spec.name

    async def put_files(self, container_id: str, files: Sequence[ContainerFile]) -> None:
        """Before the start: kept for it. Once running: written into the task if it runs
        on this node, never by updating the service (that would replace the task and kill
        the user's processes)."""
        if container_id in self._pending:
            kept = {f.path: f for f in self._files.get(container_id, [])}
            kept.update({f.path: f for f in files})
            self._files[container_id] = list(kept.values())
            return
        kept = {f.path: f for f in self._rewritten.get(container_id, [])}
        kept.update({f.path: f for f in files})
        self._rewritten[container_id] = list(kept.values())  # for a task Swarm replaces
        await self._rewrite(container_id)

    async def _rewrite_quietly(self, service: str) -> None:
        """:meth:`_rewrite` for a task Swarm replaced: a failure is logged, and the user
        still gets in (with the session facts of the start)."""
        try:
            await self._rewrite(service)
        except GatewayError as exc:
            log.warning("service %s: rewriting files failed: %s", service, exc.log_message)

    async def _rewrite(self, service: str) -> None:
        """Write the files rewritten since the start into the service's running task:
        through the control channel (any node), else through the Engine if the task runs
        on this node (elsewhere they stay as made; the keys hold anyway, see
        session_files.key_expiry)."""
        files = self._rewritten.get(service)
        if not files:
            return
        if self._channel is not None:
            found = await self._address(service, await self._tasks(service))
            if found is None:
                log.warning("service %s: no running task to write files into", service)
                return
            await self._channel.write_files(self._sessions.get(service, ""), found[1], files)
            return
        task_container = await self._local_container(service)
        if task_container is None:
            log.warning("service %s: its task is not on this node; files not rewritten", service)
            return
        await self._local.put_files(task_container, files)

    async def start(self, container_id: str, network: str) -> ContainerInfo:
        """Create the service (and its secrets and configs) unless it exists, then return
        once its task runs.

        Raises:
            NoCapacity: no node took the task within ``place_timeout`` (the engine's
                reason, e.g. "no suitable node (insufficient resources on 2 nodes)").
            ContainerStartFailed: the engine refused, or the task failed or was rejected
                (with the engine's reason). The caller bounds the time.
        """
        spec = self._pending.get(container_id)
        if spec is not None and await self._service(container_id) is None:
            files = self._files.get(container_id, [])
            if self._channel is not None:
                files = [*files, self._channel.authorized_keys_file()]
            references = await self._file_references(spec, files)
            body = service_spec(spec, references, await self._placement_of_tasks())
            await self._call(
                f"create service {spec.name}", lambda: self._docker.services.create(**body)
            )
        self._pending.pop(container_id, None)
        self._files.pop(container_id, None)
        placed_by = asyncio.get_running_loop().time() + self._place_timeout
        while True:
            info = await self.inspect(container_id, network)
            if info is None:
                raise ContainerStartFailed(f"the service {container_id} vanished while starting")
            if info.ip is not None:
                return info
            tasks = await self._tasks(container_id)
            reason = unplaced_reason(tasks)
            if reason is not None and asyncio.get_running_loop().time() > placed_by:
                raise NoCapacity(f"no node can run the session now: {reason}")
            check_not_failed(tasks)
            await asyncio.sleep(TASK_POLL_SECONDS)

    async def _file_references(
        self, spec: ContainerSpec, files: Sequence[ContainerFile]
    ) -> list[dict[str, Any]]:
        labels = {
            LABEL_SERVICE: spec.name,
            LABEL_SESSION: spec.labels.get(LABEL_SESSION, ""),
            LABEL_INSTANCE: spec.labels.get(LABEL_INSTANCE, ""),
        }
        references = []
        for file in files:
            name = file_object_name(spec.name, file)
            objects = self._docker.secrets if is_secret(file) else self._docker.configs
            object_id = await self._create_object(objects, name, file.content, labels)
            references.append(file_reference(file, object_id, name))
        return references

    async def _create_object(
        self, objects: Any, name: str, content: bytes, labels: dict[str, str]
    ) -> str:
        """The id of the secret or config ``name``, created unless a retry made it."""
        data = base64.b64encode(content).decode()
        try:
            created = await bounded(
                f"store {name}",
                lambda: objects.create(name, data, b64=True, labels=labels),
                CALL_TIMEOUT_SECONDS,
            )
            return created["ID"]
        except DockerError as exc:
            if exc.status != 409:
                raise translate_error(exc, f"store {name}") from exc
        found = await self._call(f"inspect {name}", lambda: objects.inspect(name))
        return found["ID"]

    async def _service(self, name: str) -> Mapping[str, Any] | None:
        try:
            return await bounded(
                f"inspect service {name}",
                lambda: self._docker.services.inspect(name),
                CALL_TIMEOUT_SECONDS,
            )
        except DockerError as exc:
            if exc.status == 404:
                return None
            raise translate_error(exc, f"inspect service {name}") from exc

    async def _tasks(self, service: str) -> list[Mapping[str, Any]]:
        return await self._call(
            f"list the tasks of {service}",
            lambda: self._docker.tasks.list(filters={"service": service}),
        )

    async def nodes(self) -> list[NodeInfo]:
        gateway_node = await self._own_node()
        found = await self._call("list nodes", self._docker.nodes.list)
        return [node_info(node, gateway_node) for node in found]

    async def _node_addresses(self) -> dict[str, str]:
        """The addresses of the nodes that are up (and every node's host name, kept)."""
        nodes = await self._call("list nodes", self._docker.nodes.list)
        for node in nodes:
            hostname = (node.get("Description") or {}).get("Hostname")
            if hostname:
                self._hostnames[node["ID"]] = hostname
        return {
            n["ID"]: status.get("Addr", "")
            for n in nodes
            if (status := n.get("Status") or {}).get("State") == "ready"
        }

    async def _address(
        self, service: str, tasks: Sequence[Mapping[str, Any]]
    ) -> tuple[Mapping[str, Any], tuple[str, int]] | None:
        """A running task that has an address, and that address; notes the task's node."""
        if not any((t.get("Status") or {}).get("State") == "running" for t in tasks):
            return None
        nodes = await self._node_addresses()
        for task in tasks:
            if address := task_address(task, nodes):
                self._where[service] = self._hostnames.get(task["NodeID"], task["NodeID"])
                return task, address
        return None

    def node_of(self, container_id: str) -> str | None:
        return self._where.get(container_id)

    async def inspect(self, container_id: str, network: str) -> ContainerInfo | None:
        """The service as a container: running while Swarm means to run a task for it;
        ``ip`` and ``ssh_port`` are its running task's node address and published port."""
        service = await self._service(container_id)
        if service is None:
            if container_id in self._pending:  # created, not started: like a made container
                spec = self._pending[container_id]
                return ContainerInfo(container_id, spec.name, False, None, dict(spec.labels))
            return None
        tasks = await self._tasks(container_id)
        labels = dict((service.get("Spec") or {}).get("Labels") or {})
        self._sessions[container_id] = labels.get(LABEL_SESSION, "")
        found = await self._address(container_id, tasks)
        task, address = found if found else (None, None)
        return ContainerInfo(
            id=container_id,
            name=container_id,
            running=wants_to_run(tasks) and not stranded(tasks, utcnow(), self._place_timeout),
            ip=address[0] if address else None,
            labels=labels,
            ssh_port=address[1] if address else 22,
            gpu_uuid=assigned_slice(task) if task else None,
            task_id=task.get("ID") if task else None,
        )

    def address_lookup(self, container_id: str, network: str) -> AddressLookup | None:
        async def lookup() -> tuple[str, int] | None:
            """The running task's address, once its sshd has answered (a task is
            "running" a moment before its sshd listens); while Swarm replaces the task,
            wait up to :data:`REPLACEMENT_WAIT_SECONDS` for the new one."""
            loop = asyncio.get_running_loop()
            deadline = loop.time() + REPLACEMENT_WAIT_SECONDS
            while True:
                tasks = await self._tasks(container_id)
                found = await self._address(container_id, tasks)
                if found is not None:
                    task_id, address = found[0]["ID"], found[1]
                    if self._answering.get(container_id) == task_id:
                        return address
                    if await sshd_answers(address):
                        self._answering[container_id] = task_id
                        await self._rewrite_quietly(container_id)  # a new task
                        return address
                if not wants_to_run(tasks):
                    return None
                if loop.time() > deadline:
                    return found[1] if found else None
                await asyncio.sleep(TASK_POLL_SECONDS)

        return lookup

    async def remove(self, container_id: str) -> None:
        """Remove the service, wait for its task to stop (:meth:`_wait_tasks_gone`), then
        remove its secrets and configs (idempotent)."""
        session_id = self._sessions.get(container_id)  # before its removal event pops it
        self._pending.pop(container_id, None)
        self._answering.pop(container_id, None)
        self._rewritten.pop(container_id, None)
        self._where.pop(container_id, None)
        self._files.pop(container_id, None)
        try:
            await bounded(
                f"remove service {container_id}",
                lambda: self._docker.services.delete(container_id),
                CALL_TIMEOUT_SECONDS,
            )
        except DockerError as exc:
            if exc.status != 404:
                raise translate_error(exc, f"remove service {container_id}") from exc
        if session_id:
            await self._wait_tasks_gone(session_id)
        filters = {"label": f"{LABEL_SERVICE}={container_id}"}
        for objects in (self._docker.secrets, self._docker.configs):
            for found in await self._call(
                "list secrets", lambda o=objects: o.list(filters=filters)
            ):
                try:
                    await bounded(
                        f"remove {found['ID']}",
                        lambda o=objects, f=found: o.delete(f["ID"]),
                        CALL_TIMEOUT_SECONDS,
                    )
                except DockerError as exc:
                    if exc.status != 404:
                        raise translate_error(exc, f"remove {found['ID']}") from exc

    async def _wait_tasks_gone(self, session_id: str) -> None:
        """Return once the tasks of the session's removed service have stopped, so their
        GPU slices are free when the session has ended (found by the session label: a
        removed service's name no longer filters); after :data:`TASKS_GONE_WAIT_SECONDS`
        log and return. Tasks on nodes that are down are not waited for."""
        filters = {"label": f"{LABEL_SESSION}={session_id}"}
        deadline = asyncio.get_running_loop().time() + TASKS_GONE_WAIT_SECONDS
        while True:
            tasks = await self._call(
                f"list the tasks of session {session_id}",
                lambda: self._docker.tasks.list(filters=filters),
            )
            if not stopping(tasks, await self._node_addresses()):
                return
            if asyncio.get_running_loop().time() > deadline:
                log.warning("session %s: its removed task has not stopped yet", session_id)
                return
            await asyncio.sleep(TASK_POLL_SECONDS)

    async def list_owned(self, instance: str, network: str) -> list[ContainerInfo]:
        """``instance``'s services, and the services whose secrets or configs were made by a
        start that never made the service (as not running), so orphans of both go."""
        label = f"{LABEL_INSTANCE}={instance}"
        services = await self._call(
            "list services", lambda: self._docker.services.list(filters={"label": label})
        )
        infos = []
        for service in services:
            info = await self.inspect(service["Spec"]["Name"], network)
            if info is not None:
                infos.append(info)
        known = {i.id for i in infos} | set(self._pending)
        for objects in (self._docker.secrets, self._docker.configs):
            for found in await self._call(
                "list secrets", lambda o=objects: o.list(filters={"label": label})
            ):
                labels = (found.get("Spec") or {}).get("Labels") or {}
                name = labels.get(LABEL_SERVICE, "")
                if name and name not in known:
                    known.add(name)
                    infos.append(ContainerInfo(name, name, False, None, labels))
        return infos

    async def container_exits(self, instance: str) -> AsyncIterator[str]:
        """Session ids whose service was removed behind the gateway's back. A task that
        dies is Swarm's to replace; the sweep ends a service that gave up."""
        filters = {"type": ["service"], "event": ["remove"]}
        async for event in follow_events(self._docker, filters, "service events"):
            name = event.get("Actor", {}).get("Attributes", {}).get("name", "")
            if session_id := self._sessions.pop(name, ""):
                yield session_id

    async def _local_container(self, service: str) -> str | None:
        """The container of the service's running task, if that task runs on this node."""
        node = await self._own_node()
        for task in await self._tasks(service):
            status = task.get("Status") or {}
            if status.get("State") == "running" and task.get("NodeID") == node:
                return (status.get("ContainerStatus") or {}).get("ContainerID")
        return None

    async def _on_task(self, service: str) -> str:
        task_container = await self._local_container(service)
        if task_container is None:
            raise ContainerStartFailed(
                f"the task of service {service} does not run on this node",
                log_message=f"service {service}: no running task on node {self._node_id}",
            )
        return task_container

    async def cpu_seconds(self, container_id: str) -> float | None:
        """The running task's CPU time: through the control channel (any node), else
        through the Engine if it runs on this node; None when no task runs, or it runs
        elsewhere without a channel (idle reclaim then has no compute verdict)."""
        if self._channel is not None:
            found = await self._address(container_id, await self._tasks(container_id))
            if found is None:
                return None
            return await self._channel.cpu_seconds(self._sessions.get(container_id, ""), found[1])
        task_container = await self._local_container(container_id)
        if task_container is None:
            return None
        return await self._local.cpu_seconds(task_container)

    async def tell(self, container_id: str, message: str) -> None:
        """Through the control channel (any node), else through the Engine on this node.

        Raises:
            ContainerStartFailed: no running task to tell, or the channel failed.
        """
        if self._channel is None:
            await self._local.tell(await self._on_task(container_id), message)
            return
        address = await self._task_address(container_id, "a message")
        await self._channel.wall(self._sessions.get(container_id, ""), address, message)

    async def visible_gpus(self, container_id: str) -> CommandResult:
        """Through the control channel (any node), else through the Engine on this node.

        Raises:
            ContainerStartFailed: no running task to ask, or the channel failed.
        """
        if self._channel is None:
            return await self._local.visible_gpus(await self._on_task(container_id))
        address = await self._task_address(container_id, "the GPU check")
        return await self._channel.visible_gpus(self._sessions.get(container_id, ""), address)

    async def gpu_reading(self, container_id: str) -> Reading | None:
        """Through the control channel, from inside the task (any node: the manager's NVML
        sees only its own GPUs); None without a channel (the gateway's backend then reads
        the slice if it is this node's, else reports it unknown).

        Raises:
            ContainerStartFailed: no running task to ask, the channel failed, or
                ``nvidia-smi`` there said nothing usable.
        """
        if self._channel is None:
            return None
        address = await self._task_address(container_id, "the GPU reading")
        return await self._channel.gpu_reading(self._sessions.get(container_id, ""), address)

    async def _task_address(self, service: str, purpose: str) -> tuple[str, int]:
        """Where the service's running task answers, for the control channel.

        Raises:
            ContainerStartFailed: no task runs.
        """
        found = await self._address(service, await self._tasks(service))
        if found is None:
            raise ContainerStartFailed(
                f"service {service} has no running task to reach",
                log_message=f"service {service}: no running task for {purpose}",
            )
        return found[1]

    async def logs(self, container_id: str, tail: int = 20) -> str:
        try:
            lines = await bounded(
                f"the log of {container_id}",
                lambda: self._docker.services.logs(
                    container_id, stdout=True, stderr=True, tail=str(tail)
                ),
                CALL_TIMEOUT_SECONDS,
            )
        except (DockerError, GatewayError):
            return ""
        return "".join(lines).strip()

    async def exec(self, container_id: str, argv: list[str], *, user: str) -> None:
        await self._local.exec(await self._on_task(container_id), argv, user=user)

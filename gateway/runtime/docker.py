"""The Docker implementation of :class:`~gateway.runtime.base.Runtime`, via aiodocker.

Translates Docker API failures into gateway errors: an unreachable engine is
:class:`DockerUnavailable`; a 404 on inspect or remove means "gone". Every call but the
event stream is bounded by :data:`CALL_TIMEOUT_SECONDS` (aiodocker sets no timeout): an
engine that does not answer, e.g. a ``docker rm -f`` of a GPU process stuck in the
kernel, is :class:`DockerUnavailable` too, and the caller retries later.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import tarfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiodocker
import aiohttp
from aiodocker.events import DockerEvents
from aiodocker.exceptions import DockerError

from gateway.core.gpu_delivery import DEVICE_REQUEST, GpuPath, gpu_host_config, gpu_path
from gateway.core.idle import Reading
from gateway.errors import ContainerStartFailed, DockerUnavailable
from gateway.runtime.base import (
    GPU_LIST,
    LABEL_INSTANCE,
    LABEL_SESSION,
    AddressLookup,
    CommandResult,
    ContainerFile,
    ContainerInfo,
    ContainerSpec,
    NodeInfo,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Docker's status for "could not reach the engine" in aiodocker.
_UNREACHABLE = 900
#: The longest one engine call may take (removing a container with a large GPU process
#: takes seconds; a minute without an answer is a hung engine).
CALL_TIMEOUT_SECONDS = 60.0
TTY_GROUP = 5  # wall writes to ptys of mode 0620, group tty; root here lacks DAC_OVERRIDE


def translate_error(exc: DockerError, doing: str) -> Exception:
    if exc.status == _UNREACHABLE:
        return DockerUnavailable("the Docker engine is unreachable", log_message=f"{doing}: {exc}")
    return ContainerStartFailed(f"Docker refused to {doing}: {exc.message}")


async def bounded(doing: str, call: Callable[[], Awaitable[T]], seconds: float) -> T:
    """``call()``, given at most ``seconds``.

    Raises:
        DockerUnavailable: the engine did not answer in time.
    """
    try:
        async with asyncio.timeout(seconds):
            return await call()
    except TimeoutError:
        raise DockerUnavailable(
            "the Docker engine did not answer in time",
            log_message=f"{doing}: no answer within {seconds:g} s",
        ) from None


async def engine_call(
    doing: str, call: Callable[[], Awaitable[T]], seconds: float = CALL_TIMEOUT_SECONDS
) -> T:
    """``call()``, bounded (:func:`bounded`), the engine's errors translated
    (:func:`translate_error`)."""
    try:
        return await bounded(doing, call, seconds)
    except DockerError as exc:
        raise translate_error(exc, doing) from exc


async def follow_events(
    docker: aiodocker.Docker, filters: dict[str, list[str]], what: str
) -> AsyncIterator[dict[str, Any]]:
    """The engine's events matching ``filters``, until its stream ends.

    Raises:
        DockerUnavailable, ContainerStartFailed: the stream failed (as translated).
    """
    events = DockerEvents(docker)
    subscriber = events.subscribe(filters=json.dumps(filters))
    try:
        while (event := await subscriber.get()) is not None:
            yield event
        (ended,) = await asyncio.gather(events.task, return_exceptions=True)
        if isinstance(ended, DockerError):
            raise translate_error(ended, f"follow {what}") from ended
        if isinstance(ended, aiohttp.ClientError):  # the engine went away mid-stream
            raise DockerUnavailable(
                "the Docker engine is unreachable", log_message=f"{what}: {ended}"
            ) from ended
    finally:
        with contextlib.suppress(DockerError, aiohttp.ClientError):  # reported above
            await events.stop()


def container_config(spec: ContainerSpec, delivery: str = DEVICE_REQUEST) -> dict[str, Any]:
    """The Docker ``containers/create`` body for ``spec``; a GPU is handed over as
    ``delivery`` says (:mod:`gateway.core.gpu_delivery`)."""
    host_config: dict[str, Any] = {
        "Binds": [f"{spec.workspace}:{spec.home}:rw"],
        "CapDrop": ["ALL"],
        "CapAdd": list(spec.cap_add),
        "SecurityOpt": ["no-new-privileges:true"],
        "PidsLimit": spec.pids_limit,
        "NetworkMode": spec.network,
        "RestartPolicy": {"Name": "no"},
        "Init": False,
    }
    if spec.cpu_limit is not None:
        host_config["NanoCpus"] = round(spec.cpu_limit * 1e9)
    if spec.memory_limit is not None:  # swap counts against the same limit
        host_config["Memory"] = host_config["MemorySwap"] = spec.memory_limit
    if spec.device_request and spec.gpu_uuid:
        host_config.update(gpu_host_config(delivery, spec.gpu_uuid))
    return {
        "Image": spec.image,
        "Hostname": spec.hostname,
        "Env": [f"{key}={value}" for key, value in spec.env.items()],
        "Labels": spec.labels,
        "ExposedPorts": {"22/tcp": {}},
        "HostConfig": host_config,
    }


def tar_archive(files: Sequence[ContainerFile]) -> bytes:
    """An uncompressed tar of ``files`` (root-owned, paths relative to ``/``)."""
    buffer = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for file in files:
            entry = tarfile.TarInfo(file.path.lstrip("/"))
            entry.size, entry.mode, entry.mtime = len(file.content), file.mode, now
            tar.addfile(entry, io.BytesIO(file.content))
    return buffer.getvalue()


def _info(data: dict[str, Any], network: str) -> ContainerInfo:
    state = data.get("State", {})
    networks = data.get("NetworkSettings", {}).get("Networks") or {}
    ip = (networks.get(network) or {}).get("IPAddress") or None
    return ContainerInfo(
        id=data["Id"],
        name=data.get("Name", "").lstrip("/"),
        running=bool(state.get("Running")),
        ip=ip,
        labels=dict(data.get("Config", {}).get("Labels") or {}),
    )


class DockerRuntime:
    """Session containers on the local Docker engine."""

    gone_reason = "container_gone"

    def __init__(
        self, docker: aiodocker.Docker | None = None, *, timeout: float = CALL_TIMEOUT_SECONDS
    ) -> None:
        self._docker = docker or aiodocker.Docker()
        self._timeout = timeout
        self._gpu_path: GpuPath | None = None

    async def gpu_path(self) -> GpuPath:
        """How this daemon hands GPUs to containers (``docker info``, read once)."""
        if self._gpu_path is None:
            self._gpu_path = gpu_path(
                await self._call("report its state", self._docker.system.info)
            )
        return self._gpu_path

    async def close(self) -> None:
        await self._docker.close()

    async def _bounded(self, doing: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, given at most the call timeout.

        Raises:
            DockerUnavailable: the engine did not answer in time.
        """
        return await bounded(doing, call, self._timeout)

    async def _call(self, doing: str, call: Callable[[], Awaitable[T]]) -> T:
        return await engine_call(doing, call, self._timeout)

    async def ping(self) -> None:
        await self._call("answer a ping", self._docker.version)

    async def ensure_network(self, name: str, *, egress: bool) -> None:
        """Create the bridge ``name`` (inter-container traffic off) unless it exists."""
        await self.create_network(
            {
                "Name": name,
                "Driver": "bridge",
                "Internal": not egress,
                "Labels": {"sandman.network": "1"},
                "Options": {"com.docker.network.bridge.enable_icc": "false"},
            }
        )

    async def create_network(self, config: dict[str, Any]) -> None:
        """Create the network ``config`` describes unless one of its name exists."""
        name = config["Name"]
        try:
            await self._bounded(f"look up network {name}", lambda: self._docker.networks.get(name))
            return
        except DockerError as exc:
            if exc.status != 404:
                raise translate_error(exc, f"look up network {name}") from exc
        try:
            await self._bounded(
                f"create network {name}",
                lambda: self._docker.networks.create({**config, "CheckDuplicate": True}),
            )
            log.info("created Docker network %s: %s", name, config)
        except DockerError as exc:
            if exc.status != 409:  # created concurrently
                raise translate_error(exc, f"create network {name}") from exc

    async def create(self, spec: ContainerSpec) -> str:
        delivery = (await self.gpu_path()).delivery if spec.device_request else DEVICE_REQUEST
        config = container_config(spec, delivery)
        container = await self._call(
            f"create container {spec.name}",
            lambda: self._docker.containers.create(config, name=spec.name),
        )
        return container.id

    async def start(self, container_id: str, network: str) -> ContainerInfo:
        container = self._docker.containers.container(container_id)
        await self._call(f"start container {container_id[:12]}", container.start)
        data = await self._call(f"inspect container {container_id[:12]}", container.show)
        return _info(data, network)

    async def inspect(self, container_id: str, network: str) -> ContainerInfo | None:
        container = self._docker.containers.container(container_id)
        doing = f"inspect container {container_id[:12]}"
        try:
            return _info(await self._bounded(doing, container.show), network)
        except DockerError as exc:
            if exc.status == 404:
                return None
            raise translate_error(exc, doing) from exc

    async def remove(self, container_id: str) -> None:
        container = self._docker.containers.container(container_id)
        doing = f"remove container {container_id[:12]}"
        try:
            await self._bounded(doing, lambda: container.delete(force=True, v=True))
        except DockerError as exc:
            if exc.status in (404, 409):  # gone, or removal already in progress
                return
            raise translate_error(exc, doing) from exc

    async def put_files(self, container_id: str, files: Sequence[ContainerFile]) -> None:
        container = self._docker.containers.container(container_id)
        archive = tar_archive(files)
        await self._call(
            f"copy files into container {container_id[:12]}",
            lambda: container.put_archive("/", archive),
        )

    async def list_owned(self, instance: str, network: str) -> list[ContainerInfo]:
        filters = json.dumps({"label": [f"{LABEL_INSTANCE}={instance}"]})
        found = await self._call(
            "list containers", lambda: self._docker.containers.list(all="1", filters=filters)
        )
        infos = []
        for container in found:
            info = await self.inspect(container.id, network)
            if info is not None:
                infos.append(info)
        return infos

    def address_lookup(self, container_id: str, network: str) -> AddressLookup | None:
        return None  # a container keeps its address on its network until it is removed

    async def container_exits(self, instance: str) -> AsyncIterator[str]:
        filters = {
            "type": ["container"],
            "event": ["die", "destroy"],
            "label": [f"{LABEL_INSTANCE}={instance}"],
        }
        async for event in follow_events(self._docker, filters, "container events"):
            labels = event.get("Actor", {}).get("Attributes", {})
            if session_id := labels.get(LABEL_SESSION):
                yield session_id

    def node_of(self, container_id: str) -> str | None:
        return None  # this host

    async def nodes(self) -> list[NodeInfo]:
        info = await self._call("describe the engine", self._docker.system.info)
        node = NodeInfo(
            id=info.get("ID", ""),
            hostname=info.get("Name", ""),
            role="standalone",
            state="ready",
            availability="active",
            address=None,
            cpus=float(info.get("NCPU", 0)),
            memory=int(info.get("MemTotal", 0)),
            engine_version=info.get("ServerVersion", ""),
            gateway=True,
        )
        return [node]

    async def logs(self, container_id: str, tail: int = 20) -> str:
        container = self._docker.containers.container(container_id)
        try:
            lines = await self._bounded(
                "read the container's log",
                lambda: container.log(stdout=True, stderr=True, tail=tail),
            )
        except (DockerError, DockerUnavailable):  # best effort: the log tail of a failure
            return ""
        return "".join(lines).strip()

    async def exec(self, container_id: str, argv: list[str], *, user: str) -> None:
        container = self._docker.containers.container(container_id)

        async def run() -> None:
            execution = await container.exec(argv, stdout=False, stderr=False, user=user)
            await execution.start(detach=True)

        await self._call(f"exec in container {container_id[:12]}", run)

    async def tell(self, container_id: str, message: str) -> None:
        await self.exec(container_id, ["wall", message], user=f"0:{TTY_GROUP}")

    async def cpu_seconds(self, container_id: str) -> float | None:
        """From the engine's one-shot stats (the cgroup's CPU usage, v1 or v2)."""
        path = f"containers/{container_id}/stats"
        try:
            stats = await self._docker._query_json(path, params={"stream": "0", "one-shot": "1"})
        except DockerError as exc:
            if exc.status == 404:
                return None
            raise translate_error(exc, f"read the stats of container {container_id[:12]}") from exc
        usage = (stats.get("cpu_stats") or {}).get("cpu_usage") or {}
        total = usage.get("total_usage")
        return None if not isinstance(total, int) else total / 1e9

    async def gpu_reading(self, container_id: str) -> Reading | None:
        """None: this host's GPUs, which the gateway's own backend (NVML) reads."""
        return None

    async def visible_gpus(self, container_id: str) -> CommandResult:
        """:data:`GPU_LIST` through ``docker exec`` (this engine's containers only)."""
        container = self._docker.containers.container(container_id)

        async def go() -> CommandResult:
            execution = await container.exec(list(GPU_LIST), stdout=True, stderr=True, user="0:0")
            chunks: list[bytes] = []
            async with execution.start(detach=False) as stream:
                while (message := await stream.read_out()) is not None:
                    chunks.append(message.data)
            exit_code = (await execution.inspect())["ExitCode"]
            return CommandResult(exit_code, b"".join(chunks).decode(errors="replace"))

        return await self._call(f"run {GPU_LIST[0]} in container {container_id[:12]}", go)


async def probe_gpu_path() -> dict[str, Any]:
    """For ``sandman gpus --probe``: how the local daemon hands GPUs over, read-only."""
    runtime = DockerRuntime()
    try:
        return (await runtime.gpu_path()).view()
    except DockerUnavailable as exc:
        return {"error": exc.log_message}
    finally:
        await runtime.close()

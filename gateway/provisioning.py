"""Provisioning: everything that makes one session's container, and talks to it.

The orchestrator (:mod:`gateway.sessions`) decides *when*; this module knows *how*: the
container's spec and name, the files copied into it (:mod:`gateway.session_files`), the
user's workspace on the host, the wait for its sshd, and the messages written to its
terminals. Nothing here reads or writes the session's row.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import timedelta
from pathlib import Path

from gateway import session_files
from gateway.config import Config
from gateway.errors import ContainerStartFailed, GatewayError
from gateway.gpu.allocator import GpuAllocator
from gateway.gpu.pin import verify_pin
from gateway.models import Credentials, Session, utcnow
from gateway.runtime.base import (
    LABEL_INSTANCE,
    LABEL_SESSION,
    LABEL_USER,
    SSHD_CAPABILITIES,
    ContainerFile,
    ContainerInfo,
    ContainerSpec,
    Runtime,
)
from gateway.ssh.identity import HostIdentity
from gateway.ssh.probe import Probe, probe_sshd

log = logging.getLogger(__name__)

READY_POLL_SECONDS = 0.1


def container_name(session: Session) -> str:
    """The container's name, derived from the row, so a cleanup finds a container even
    when the create that made it could not store its id."""
    return f"sandman-{session.user_id}-{session.id[:8]}"


class Provisioner:
    """Builds, fills, starts and addresses session containers for one gateway."""

    def __init__(
        self,
        config: Config,
        *,
        runtime: Runtime,
        gpus: GpuAllocator,
        identity: HostIdentity,
        instance_id: str,
    ) -> None:
        self._config = config
        self._runtime = runtime
        self._gpus = gpus
        self._identity = identity
        self._instance_id = instance_id

    async def prepare_workspace(self, session: Session) -> None:
        """Create the user's workspace on the host, owned by the user's stable uid."""
        await asyncio.to_thread(prepare_workspace, Path(session.workspace), session.uid)

    async def find_or_create(self, session: Session) -> str:
        """The session's container id: the one a previous try made (found by its name and
        session label), else a new one."""
        spec = self.container_spec(session)
        found = await self._runtime.inspect(spec.name, self._config.docker_network)
        if found is not None and found.labels.get(LABEL_SESSION) == session.id:
            return found.id
        return await self._runtime.create(spec)

    def container_spec(self, session: Session) -> ContainerSpec:
        user = session.user_id
        env = {
            "SANDMAN_USER": user,
            "SANDMAN_UID": str(session.uid),
            "SANDMAN_GID": str(session.uid),
            "SANDMAN_PASSWORD_AUTH": "yes" if self._config.ssh_password_auth else "no",
            **self._gpus.container_env(session.gpu_uuid),
        }
        return ContainerSpec(
            name=container_name(session),
            image=session.image,
            hostname=f"{user}-{session.id[:8]}",
            env=env,
            labels={
                LABEL_SESSION: session.id,
                LABEL_USER: user,
                LABEL_INSTANCE: self._instance_id,
            },
            workspace=Path(session.workspace),
            home=f"/home/{user}",
            network=self._config.docker_network,
            pids_limit=self._config.pids_limit,
            gpu_uuid=session.gpu_uuid,
            device_request=self._gpus.needs_device_request and session.gpu_uuid is not None,
            # a profile with no device yet: the engine picks it (Swarm), and start() tells
            gpu_slice=session.mig_profile if session.gpu_uuid is None else None,
            cap_add=SSHD_CAPABILITIES,
            cpu_limit=session.cpu_limit,
            memory_limit=session.memory_limit,
        )

    async def write_files(self, container_id: str, session: Session, creds: Credentials) -> None:
        """Copy in the host key and certificate, expiring authorized keys, password hash
        and session facts."""
        await self._runtime.put_files(container_id, self.container_files(session, creds))

    async def rewrite_expiring(self, container_id: str, session: Session) -> None:
        """Rewrite what follows the expiry (authorized keys, session facts)."""
        files = session_files.expiring_files(session, self._config)
        await self._runtime.put_files(container_id, files)

    def container_files(self, session: Session, creds: Credentials) -> list[ContainerFile]:
        issued = utcnow()  # clients check validity against their wall clocks, so use ours
        keys = self._identity.certify(
            session.user_id,
            session.id,
            valid_after=issued - session_files.CERT_BACKDATE,
            valid_before=issued
            + timedelta(minutes=self._config.max_ttl_minutes)
            + session_files.CERT_MARGIN,
        )
        files = [
            *session_files.host_key_files(keys),
            *session_files.settings_files(self._config),
        ]
        if self._config.ssh_password_auth:
            files.append(session_files.password_file(creds.password_hash))
        return files + session_files.expiring_files(session, self._config)

    async def start(self, container_id: str) -> ContainerInfo:
        """Start the container.

        Raises:
            ContainerStartFailed: it has no address on the session network.
        """
        info = await self._runtime.start(container_id, self._config.docker_network)
        if info.ip is None:
            raise ContainerStartFailed(
                f"the session container has no address on network {self._config.docker_network}"
            )
        return info

    async def check_gpu(self, session: Session, container_id: str, info: ContainerInfo) -> None:
        """Check that the started container sees exactly its GPU: the slice the engine
        assigned its task (Swarm: asked through the control channel, so once its sshd
        answers), or the GPU the gateway gave it by DeviceRequest (plain Docker with real
        GPUs). A GPU-less session, or simulated GPUs, has nothing to check.

        Raises:
            ContainerStartFailed: it sees other or more devices, or could not be asked.
        """
        expected = info.gpu_uuid or (session.gpu_uuid if self._gpus.needs_device_request else None)
        if expected:
            await verify_pin(self._runtime, container_id, expected)

    async def wait_ready(
        self, session: Session, container_id: str, address: tuple[str, int]
    ) -> None:
        """Return once the container's own sshd answers on ``address`` with this session's
        certified host key (checked directly, not through the session port, so no user
        connection is recorded).

        Raises:
            ContainerStartFailed: the container exited before answering, or another
                SSH server answered at its address.
        """
        known_hosts = self._identity.session_known_hosts(session.id)
        alias = self._identity.session_principal(session.id)
        while True:
            probe = await probe_sshd(*address, known_hosts=known_hosts, alias=alias)
            if probe is Probe.READY:
                return
            if probe is Probe.WRONG_HOST:
                raise ContainerStartFailed(
                    "an SSH server without this session's host key answered at the "
                    "container's address",
                    log_message=f"container {container_id[:12]} at {address}: wrong host key",
                )
            info = await self._runtime.inspect(container_id, self._config.docker_network)
            if info is None or not info.running:
                tail = await self._runtime.logs(container_id)
                raise ContainerStartFailed(
                    "the session container exited before its SSH server started",
                    log_message=f"container {container_id[:12]} exited; log tail:\n{tail}",
                )
            await asyncio.sleep(READY_POLL_SECONDS)

    async def remove(self, session: Session) -> None:
        """Remove the session's container (idempotent): by its stored id, else the one
        under its name, but only if it carries this session's label: a create that failed
        before storing an id may have met a name held by another container."""
        if session.container_id:
            await self._runtime.remove(session.container_id)
            return
        found = await self._runtime.inspect(container_name(session), self._config.docker_network)
        if found is not None and found.labels.get(LABEL_SESSION) == session.id:
            await self._runtime.remove(found.id)

    async def tell(self, session: Session, message: str) -> None:
        """Write ``message`` to every terminal open in the session's container (``wall``);
        best effort: a failure is logged."""
        if not session.container_id:
            return
        try:
            await self._runtime.tell(session.container_id, message)
        except GatewayError as exc:
            log.warning("session %s: message to terminals failed: %s", session.id, exc.log_message)


def prepare_workspace(path: Path, uid: int) -> None:
    """Create the user's workspace owned by ``uid`` (gid = uid), keeping what it holds."""
    path.mkdir(parents=True, exist_ok=True)
    stat = path.stat()
    if (stat.st_uid, stat.st_gid) != (uid, uid):
        os.chown(path, uid, uid)
    path.chmod(0o750)

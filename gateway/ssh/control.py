"""The gateway's control channel into a session: an SSH login as ``root`` with the gateway's
own key, which the session's ``authorized_keys/root`` forces to run ``sandman-control``
(no pty, no forwarding). It reaches a task on any Swarm node the way users do, where the
Engine's ``exec`` and archive upload reach only the manager's own containers.

The server must prove it holds the session's certified host key (as the readiness check
does), so the gateway never sends a session's facts to another server.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import asyncssh

from gateway.core import gpu_activity
from gateway.core.gpu_activity import command_run
from gateway.core.idle import Reading
from gateway.errors import ContainerStartFailed
from gateway.runtime.base import CommandResult, ContainerFile
from gateway.ssh.identity import HostIdentity, create_secret

CONTROL_KEY = "control_ed25519"
CONTROL_COMMAND = "/usr/local/sbin/sandman-control"
#: The control key's file in a session (the entrypoint allows root only when it exists).
ROOT_AUTHORIZED_KEYS = "/etc/ssh/authorized_keys/root"
CONTROL_TIMEOUT = 10.0

T = TypeVar("T")


def gpu_listing(answer: str) -> CommandResult | None:
    """The ``nvidia-smi -L`` run that ``sandman-control`` reports for ``{"read": "gpus"}``
    (``{"exit_code": <int>, "output": <text>}``), or None if ``answer`` is not that."""
    try:
        found = command_run(json.loads(answer))
    except ValueError:
        return None
    return None if found is None else CommandResult(*found)


def cpu_reading(answer: str) -> float | None:
    """The seconds ``sandman-control`` reports for ``{"read": "cpu"}``
    (``{"cpu_seconds": <number>}``), or None if ``answer`` is not that."""
    try:
        return float(json.loads(answer)["cpu_seconds"])
    except (ValueError, KeyError, TypeError):
        return None


def gpu_reading(answer: str) -> Reading | None:
    """The idle reading of what ``sandman-control`` reports for ``{"read": "gpu"}``
    (``{"apps": <run>, "utilization": <run>}``, see :mod:`gateway.core.gpu_activity`);
    None if ``answer`` is not that, or the processes could not be read."""
    try:
        found = json.loads(answer)
    except ValueError:
        return None
    if not isinstance(found, dict) or set(found) != {"apps", "utilization"}:
        return None
    apps, usage = command_run(found["apps"]), command_run(found["utilization"])
    if apps is None or usage is None:
        return None
    return gpu_activity.reading(apps, usage)


class ControlChannel:
    """Writes files and terminal messages into running sessions, and reads their CPU
    time, visible GPUs and GPU activity, through their sshd. Build with :meth:`open`."""

    def __init__(self, key: asyncssh.SSHKey, identity: HostIdentity) -> None:
        self._key = key
        self._identity = identity

    @classmethod
    def open(cls, state_dir: Path, identity: HostIdentity) -> ControlChannel:
        """Load the gateway's control key from ``state_dir``, made (0600) on first use."""
        path = state_dir / CONTROL_KEY
        if not path.exists():
            create_secret(path, asyncssh.generate_private_key("ssh-ed25519").export_private_key())
        return cls(asyncssh.read_private_key(path), identity)

    def authorized_keys_file(self) -> ContainerFile:
        """The session's ``authorized_keys/root``: this key, forced to ``sandman-control``."""
        public = self._key.export_public_key().decode().strip()
        line = f'restrict,command="{CONTROL_COMMAND}" {public} sandman-control\n'
        return ContainerFile(ROOT_AUTHORIZED_KEYS, line.encode())

    async def write_files(
        self, session_id: str, address: tuple[str, int], files: Sequence[ContainerFile]
    ) -> None:
        """Write ``files`` (session facts, authorized keys) into the session at ``address``.

        Raises:
            ContainerStartFailed: as :meth:`_ask`.
        """
        request = {
            "files": [
                {"path": f.path, "content": base64.b64encode(f.content).decode(), "mode": f.mode}
                for f in files
            ]
        }
        await self._ask(session_id, address, request)

    async def wall(self, session_id: str, address: tuple[str, int], message: str) -> None:
        """Write ``message`` to every terminal open in the session at ``address``.

        Raises:
            ContainerStartFailed: as :meth:`_ask`.
        """
        await self._ask(session_id, address, {"wall": message})

    async def cpu_seconds(self, session_id: str, address: tuple[str, int]) -> float:
        """The CPU time the session's processes have used so far (its cgroup, seconds).

        Raises:
            ContainerStartFailed: as :meth:`_ask`, or an answer without the figure.
        """
        return await self._read(session_id, address, "cpu", cpu_reading, "CPU reading")

    async def visible_gpus(self, session_id: str, address: tuple[str, int]) -> CommandResult:
        """What ``nvidia-smi -L`` lists in the session at ``address``, and its exit status
        (a missing or failing ``nvidia-smi`` is a result, not an error).

        Raises:
            ContainerStartFailed: as :meth:`_ask`, or an answer not understood.
        """
        return await self._read(session_id, address, "gpus", gpu_listing, "GPU listing")

    async def gpu_reading(self, session_id: str, address: tuple[str, int]) -> Reading:
        """What the GPU the session at ``address`` sees is doing, from ``nvidia-smi`` run
        there: compute processes, and a whole GPU's utilisation (unknown for a MIG device).

        Raises:
            ContainerStartFailed: as :meth:`_ask`, or an answer that says nothing usable
                (``nvidia-smi`` missing, failing or hanging there).
        """
        return await self._read(session_id, address, "gpu", gpu_reading, "GPU reading")

    async def _read(
        self,
        session_id: str,
        address: tuple[str, int],
        what: str,
        parse: Callable[[str], T | None],
        name: str,
    ) -> T:
        """The answer to ``{"read": what}``, parsed.

        Raises:
            ContainerStartFailed: as :meth:`_ask`, or ``parse`` found nothing (None).
        """
        answer = await self._ask(session_id, address, {"read": what})
        found = parse(answer)
        if found is None:
            raise ContainerStartFailed(
                f"the session's {name} was not understood",
                log_message=f"session {session_id}: sandman-control answered {answer!r}",
            )
        return found

    async def _ask(self, session_id: str, address: tuple[str, int], request: object) -> str:
        """Run ``sandman-control`` in the session at ``address`` with ``request``; its stdout.

        Raises:
            ContainerStartFailed: not reached in :data:`CONTROL_TIMEOUT`, not this
                session's server, or ``sandman-control`` refused (its message logged).
        """
        try:
            async with (
                asyncio.timeout(CONTROL_TIMEOUT),
                asyncssh.connect(
                    *address,
                    username="root",
                    client_keys=[self._key],
                    known_hosts=self._identity.session_known_hosts(session_id),
                    host_key_alias=self._identity.session_principal(session_id),
                    agent_path=None,
                    password=None,
                    kbdint_auth=False,
                    gss_auth=False,
                    config=None,
                ) as conn,
            ):
                done = await conn.run(input=json.dumps(request))
        except (OSError, TimeoutError, asyncssh.Error) as exc:
            raise ContainerStartFailed(
                "the session's control channel failed",
                log_message=f"session {session_id} at {address}: {exc!r}",
            ) from exc
        if done.exit_status != 0:
            raise ContainerStartFailed(
                "the session refused the gateway's request",
                log_message=f"session {session_id}: sandman-control exit {done.exit_status}: "
                f"{str(done.stderr).strip()}",
            )
        return str(done.stdout)

"""The readiness check: an SSH handshake with a session container's own sshd, on its own
address (never through the session port, so it is not a user's connection), that proves
the answering server holds this session's certified host key."""

from __future__ import annotations

import asyncio
import logging
from enum import Enum

import asyncssh

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 3.0
PROBE_USER = "sandman-readiness"


class Probe(Enum):
    READY = "ready"  # the key exchange verified the session's host certificate
    NOT_YET = "not_yet"  # nothing answers yet (refused, reset, or no SSH yet)
    WRONG_HOST = "wrong_host"  # an SSH server answers with another host key


async def probe_sshd(
    host: str, port: int, *, known_hosts: asyncssh.SSHKnownHosts, alias: str
) -> Probe:
    """Handshake with ``host:port`` checking its host certificate for principal ``alias``
    against ``known_hosts``. The host key is verified during key exchange, before any
    authentication, so the refusal of our (credential-less) login means the right server
    answered."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            conn = await asyncssh.connect(
                host,
                port,
                username=PROBE_USER,
                known_hosts=known_hosts,
                host_key_alias=alias,
                client_keys=None,
                password=None,
                agent_path=None,
                kbdint_auth=False,
                gss_auth=False,
                config=None,
            )
    except asyncssh.PermissionDenied:
        return Probe.READY
    except asyncssh.HostKeyNotVerifiable as exc:
        log.warning("sshd at %s:%d presented another host key: %s", host, port, exc)
        return Probe.WRONG_HOST
    except (OSError, TimeoutError, asyncssh.Error):
        return Probe.NOT_YET
    conn.abort()  # a server that let us in without credentials is not one we made
    return Probe.WRONG_HOST

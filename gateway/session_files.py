"""The files the gateway puts into a session container: the host key and its certificate,
the authorized keys (expiring with the session), the password hash, and the session facts
that ``sandman-session`` and the login message read. None of them travels in the
environment; secrets are root-only (0600)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from gateway.config import Config
from gateway.core.ssh import authorized_keys, sshd_forwarding
from gateway.models import Session, rfc3339
from gateway.runtime.base import ContainerFile
from gateway.ssh.identity import HostKeyFiles

HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"
AUTHORIZED_KEYS_DIR = "/etc/ssh/authorized_keys"
PASSWORD_HASH = "/etc/sandman/password-hash"
SESSION_INFO = "/etc/sandman/session.json"
#: Included by the image's sshd_config; an image without the include ignores it.
SSHD_FORWARDING = "/etc/ssh/sandman_forwarding.conf"
#: Present: the image's login script attaches interactive logins to tmux.
TMUX_ATTACH = "/etc/sandman/tmux-attach"
#: Host certificates are valid from a little before issue (client clocks drift) ...
CERT_BACKDATE = timedelta(minutes=5)
#: ... until well after the latest moment the session could end.
CERT_MARGIN = timedelta(days=1)


def host_key_files(keys: HostKeyFiles) -> list[ContainerFile]:
    return [
        ContainerFile(HOST_KEY, keys.private_key, 0o600),
        ContainerFile(HOST_KEY + ".pub", keys.public_key),
        ContainerFile(HOST_KEY + "-cert.pub", keys.certificate),
    ]


def password_file(password_hash: str) -> ContainerFile:
    return ContainerFile(PASSWORD_HASH, password_hash.encode() + b"\n", 0o600)


def settings_files(config: Config) -> list[ContainerFile]:
    """The files that carry the gateway's login settings: the session sshd's forwarding
    settings, and the flag that lands interactive logins in tmux (``--tmux-attach``)."""
    text = sshd_forwarding(
        agent=config.ssh_agent_forwarding, streamlocal=config.ssh_streamlocal_forwarding
    )
    files = [ContainerFile(SSHD_FORWARDING, text.encode())]
    if config.tmux_attach:
        files.append(ContainerFile(TMUX_ATTACH, b"on\n"))
    return files


def session_info(session: Session, config: Config) -> dict[str, object]:
    """What a user inside the container may want to know about the session."""
    gpu = None
    if session.gpu_uuid is not None:
        gpu = {"uuid": session.gpu_uuid, "profile": session.mig_profile}
    return {
        "user": session.user_id,
        "session_id": session.id,
        "ssh_host": config.public_host,
        "ssh_port": session.ssh_port,
        "created_at": rfc3339(session.created_at),
        "expires_at": rfc3339(session.expires_at),
        "gpu": gpu,
        "home": f"/home/{session.user_id}",
        "workspace": session.workspace,
    }


def key_expiry(session: Session, config: Config) -> datetime:
    """When the authorized keys stop working: the session's expiry. With Swarm, a task that
    Swarm restarts gets its files again from immutable secrets made at the start, so its
    keys must outlast any expiry a PATCH can set (created + ``--max-ttl-minutes``); there
    the gateway is the expiry authority: at the end it cuts every relayed connection and
    removes the service."""
    if config.runtime == "swarm":
        return session.created_at + timedelta(minutes=config.max_ttl_minutes)
    return session.expires_at


def expiring_files(session: Session, config: Config) -> list[ContainerFile]:
    """The files that change when the session's expiry moves: authorized keys (with
    ``expiry-time``, see :func:`key_expiry`) and the session facts. A session from before
    keys were recorded keeps the authorized keys it was created with."""
    info = json.dumps(session_info(session, config), indent=2).encode() + b"\n"
    files = [ContainerFile(SESSION_INFO, info)]
    if session.authorized_keys:
        text = authorized_keys(session.authorized_keys, key_expiry(session, config))
        files.append(ContainerFile(f"{AUTHORIZED_KEYS_DIR}/{session.user_id}", text.encode()))
    return files

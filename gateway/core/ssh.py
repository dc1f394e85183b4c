"""Pure SSH text formats: authorized_keys lines with an expiry, known_hosts patterns, the
command a user pastes, the session sshd's forwarding settings."""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime


def expiry_option(moment: datetime) -> str:
    """sshd's ``expiry-time`` option for ``moment``, in UTC (the ``Z`` suffix, OpenSSH 8.7+).

    sshd refuses the key once its clock passes ``moment``; seconds are kept.
    """
    return f'expiry-time="{moment.astimezone(UTC).strftime("%Y%m%d%H%M%S")}Z"'


def authorized_keys(keys: Iterable[str], expires_at: datetime) -> str:
    """The authorized_keys file for ``keys`` (``type base64`` lines), each expiring at
    ``expires_at``."""
    option = expiry_option(expires_at)
    return "".join(f"{option} {key}\n" for key in keys)


def host_patterns(hosts: Sequence[str]) -> str:
    """known_hosts patterns matching every host on any port: ``h`` alone is port 22 only,
    ``[h]:*`` every other port, so both are given."""
    return ",".join(f"{host},[{host}]:*" for host in hosts)


def known_hosts_line(hosts: Sequence[str], ca_public_key: str) -> str:
    """The one line users add to ``~/.ssh/known_hosts`` to trust every session's host key."""
    return f"@cert-authority {host_patterns(hosts)} {ca_public_key}"


def ssh_command(user: str, host: str, port: int) -> str:
    """The command a user pastes to log in."""
    target = f"{user}@{host}"
    return f"ssh -p {port} {shlex.quote(target)}"


def sshd_forwarding(*, agent: bool, streamlocal: bool) -> str:
    """The session sshd's forwarding settings, as an ``sshd_config`` fragment the image's
    configuration includes before its own defaults (for sshd the first value read wins).

    Agent forwarding still needs the client to ask (``ssh -A``); Unix socket forwarding
    replaces a stale socket left by an earlier connection (``StreamLocalBindUnlink``), so a
    forwarded gpg-agent socket works again after a reconnect. X11 stays off: there is no
    X server or ``xauth`` in the image.
    """
    yes_no = {True: "yes", False: "no"}
    return (
        "# Written by the Sandman gateway from its --ssh-*-forwarding settings.\n"
        f"AllowAgentForwarding {yes_no[agent]}\n"
        f"AllowStreamLocalForwarding {yes_no[streamlocal]}\n"
        f"StreamLocalBindUnlink {yes_no[streamlocal]}\n"
        "X11Forwarding no\n"
    )
